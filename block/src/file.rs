//! The `file` protocol driver: a regular file or a block device, through positioned syscalls.
//!
//! QEMU: `block/file-posix.c` (`raw_open_common()`, `raw_co_prw()`, `handle_aiocb_rw()`,
//! `handle_aiocb_flush()`, `handle_aiocb_write_zeroes()`, `raw_co_pdiscard()`,
//! `raw_co_block_status()`, `raw_co_truncate()`, `raw_probe_alignment()`, the image locking).
//!
//! ## Where a syscall runs
//!
//! A syscall that may sleep must not run on an event-loop thread: every other request of that
//! thread would wait. QEMU hands them to its thread pool (or to linux-aio/io_uring). We do the
//! same — [`runtime::ThreadPool::submit_co_scoped`] runs the call on a worker while the
//! coroutine yields, and the worker borrows the coroutine's buffer directly — with one shortcut
//! QEMU does not take: reads and writes are first tried **inline** with `RWF_NOWAIT`, which
//! succeeds only if the kernel can serve them without blocking (page-cache hits). A hit costs one
//! syscall and no thread hand-off; a miss (`EAGAIN`) costs one extra syscall and goes to the
//! pool. A filesystem that answers `EOPNOTSUPP` is not asked again. Measured on Linux 6.18: ext4
//! serves cached reads inline but refuses buffered `RWF_NOWAIT` writes (`EOPNOTSUPP`); tmpfs
//! refuses both — but tmpfs (like ramfs) is memory-backed, where a read or write is a memory copy
//! that never waits for a disk, so there requests up to [`INLINE_MAX`] run inline (larger ones
//! still go to the pool, so that a second CPU can copy while the queue thread reads the next
//! request; and while such a write runs, small writes go to the pool too, rather than wait on
//! the queue thread for the inode lock it holds).
//!
//! Buffered writes of a regular file that go to the pool run in one [`runtime::Lane`]: one at a
//! time, in order, each worker taking the next as soon as it is done. The kernel serialises
//! them on the inode lock anyway; sixteen writers on sixteen workers only spun and slept on it.
//! Measured on tmpfs, allocating 1 MiB writes into a qcow2 image: +10 to +20 % (see
//! `docs/performance.md`). O_DIRECT writes (which may run in parallel) and block devices go to
//! the pool as before. O_DIRECT requests always go to the pool (with O_DIRECT, `RWF_NOWAIT` does not
//! avoid waiting for the device). [`FileDriver::stats`] counts what happened.
//!
//! ## io_uring
//!
//! With [`AioMode::IoUring`] (or `Auto`, the default) and a thread whose
//! [`runtime::AioContext`] waits through io_uring, what would go to the thread pool goes on
//! that ring instead ([`runtime::uring`]): the coroutine yields, the loop's next
//! `io_uring_enter` submits the request together with everything else of that round, and the
//! completion enters the coroutine again on the same thread — no hop to a worker and back. The
//! inline attempts above are kept (a page-cache hit is still one syscall and no yield);
//! reads, O_DIRECT writes, `fdatasync` and `fallocate` go through the ring, `ftruncate` stays on
//! the pool, and so do buffered writes of a regular file, in their write lane, and a
//! memory-backed file's big reads (measured faster: see `FileDriver::ring_writes` and
//! `ring_reads`). When the ring cannot take a request (full, or the thread has
//! none) it goes to the pool as before. QEMU: `aio=io_uring` (`block/io_uring.c`).
//!
//! `lseek(SEEK_DATA/SEEK_HOLE)` runs inline, as QEMU's `raw_co_block_status()` does. Outside a
//! coroutine (opening, probing, closing at shutdown) every call simply runs on the calling
//! thread.
//!
//! ## Cache modes and alignment
//!
//! [`CacheMode::Writeback`] uses the page cache (QEMU `cache=writeback`, the default).
//! [`CacheMode::None`] opens with `O_DIRECT` (QEMU `cache=none`): offsets, lengths and buffer
//! addresses must then be multiples of the device's logical block size. We ask the kernel first
//! (`BLKSSZGET` for block devices, `statx(STATX_DIOALIGN)` for files), then probe as QEMU's
//! `raw_probe_alignment()` does — aligned O_DIRECT reads of 512, 1024, 2048, 4096 bytes until
//! one is not refused with `EINVAL`. The kernel's answer comes first because a probe read that
//! lands in a hole never fails, whatever its alignment. [`BlockDriver::request_alignment`]
//! reports the result; the [`crate::BlockBackend`] pads and bounces unaligned requests.
//!
//! ## Two engines
//!
//! This file is the driver as the coroutine engine runs it. The async engine's forms of the
//! operations that may block (`preadv_async`, …) are in `async_engine/file.rs`
//! ([`crate::async_engine`]); they share the inline attempts, the counters and the flags here
//! (`pub(crate)` for that reason) and differ only in the hand-off to the pool or the ring,
//! which must own its buffer.
//!
//! ## Errors
//!
//! A failed `fdatasync` in writeback mode poisons further flushes (QEMU's
//! `page_cache_inconsistent`): Linux may already have marked the failed pages clean, so a later
//! successful `fdatasync` would not mean the data reached the disk.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::image_lock::{self, LockError, Perm};
use crate::sys::{self, AlignedBuf, FallocMode, FileKind, OpenFlags, RwFlags, Whence};
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// How the host page cache is used. QEMU: `cache.direct`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the page cache; `co_flush` makes writes durable (QEMU `cache=writeback`).
    #[default]
    Writeback,
    /// `O_DIRECT`: no host caching; requests are aligned to the logical block size
    /// (QEMU `cache=none`).
    None,
}

/// How requests that may block are done. QEMU: `aio=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    /// On the thread pool (QEMU `aio=threads`).
    Threads,
    /// On the calling thread's io_uring (QEMU `aio=io_uring`); the pool when the thread has
    /// none. Whether it has one is the loop's choice ([`runtime::set_fd_monitor`]).
    IoUring,
    /// `IoUring` where the ring works (the default).
    #[default]
    Auto,
}

/// Options of the `file` driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open `O_RDONLY`; writes fail with [`BlockError::ReadOnly`].
    pub read_only: bool,
    pub cache: CacheMode,
    pub aio: AioMode,
    /// Take no image locks (QEMU `-U`/`--force-share`); implies `read_only`.
    pub force_share: bool,
}

/// What the I/O paths did so far (relaxed counters, for benchmarks and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Reads completed entirely inline by `preadv2(RWF_NOWAIT)`.
    pub inline_reads: u64,
    /// Writes completed entirely inline by `pwritev2(RWF_NOWAIT)`.
    pub inline_writes: u64,
    /// Inline attempts that the kernel refused (`EAGAIN`) or only partly served.
    pub inline_misses: u64,
    /// Syscalls handed to the thread pool.
    pub pool_requests: u64,
    /// Requests completed through an io_uring.
    pub ring_requests: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    inline_reads: AtomicU64,
    inline_writes: AtomicU64,
    inline_misses: AtomicU64,
    pub(crate) pool_requests: AtomicU64,
    pub(crate) ring_requests: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    // A statistic: no other memory depends on it.
    c.fetch_add(1, Ordering::Relaxed);
}

/// The `file` protocol driver. QEMU: `BDRVRawState` with `bdrv_file`/`bdrv_host_device`.
pub struct FileDriver {
    /// Shared with thread-pool jobs of the async path, which must own what they use.
    pub(crate) fd: Arc<OwnedFd>,
    path: PathBuf,
    kind: FileKind,
    read_only: bool,
    pub(crate) direct: bool,
    /// Requests that would block go to the thread's io_uring when it has one.
    pub(crate) uring: bool,
    request_alignment: u64,
    pub(crate) mem_alignment: u64,
    /// Whether this image holds lock bytes (false with force-share or without OFD support).
    locked: bool,
    // Capability flags, cleared the first time the kernel says "not supported". Relaxed: a
    // stale `true` only costs one more refused syscall.
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
    /// On tmpfs and the like, reads and writes are memory copies that never wait for a disk
    /// (and `RWF_NOWAIT` is refused): they run inline, with no thread hop at all.
    memory_backed: bool,
    /// Writes of this file running in the thread pool. While any does, a memory-backed file's
    /// small write does not run inline either: a tmpfs write holds the inode lock for its
    /// whole copy, and the queue thread would sleep on it behind a 1 MiB write (or several),
    /// reading no requests meanwhile.
    pub(crate) pool_writes: AtomicUsize,
    /// Buffered writes of a regular file go to the pool through this lane, one at a time: they
    /// serialise on the inode lock anyway (see `runtime::Lane`). `None` with O_DIRECT (writes
    /// may run in parallel) and for block devices.
    pub(crate) write_lane: Option<runtime::Lane>,
    pub(crate) has_punch_hole: AtomicBool,
    pub(crate) has_zero_range: AtomicBool,
    /// errno of a failed `fdatasync` in writeback mode; 0 if none. QEMU:
    /// `page_cache_inconsistent`.
    page_cache_inconsistent: AtomicI32,
    pub(crate) counters: Counters,
}

/// Counts a write in [`FileDriver::pool_writes`] while it lives.
pub(crate) struct PoolWrite<'a>(&'a AtomicUsize);

impl<'a> PoolWrite<'a> {
    pub(crate) fn enter(count: &'a AtomicUsize) -> PoolWrite<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        PoolWrite(count)
    }
}

impl Drop for PoolWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `path` — or, if it does not exist yet, the directory it would be created in — is on
/// a memory-backed filesystem (tmpfs, ramfs, hugetlbfs), where no request waits for a device.
/// `false` when it cannot be told.
pub fn is_in_memory(path: &Path) -> bool {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file = std::fs::File::open(path).or_else(|_| std::fs::File::open(dir));
    file.is_ok_and(|f| sys::is_memory_backed(f.as_fd()).unwrap_or(false))
}

/// Largest request a memory-backed file serves inline on the queue thread.
pub const INLINE_MAX: usize = 128 * 1024;

impl FileDriver {
    /// Opens `path` (a regular file or a block device), locks it unless `force_share`, and
    /// probes the O_DIRECT alignment if needed. Errors name the file. QEMU:
    /// `raw_open_common()`, `raw_check_perm()`.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<FileDriver> {
        let read_only = opts.read_only || opts.force_share;
        let direct = opts.cache == CacheMode::None;
        let fd = sys::open(
            path,
            OpenFlags {
                write: !read_only,
                direct,
            },
        )
        .map_err(|e| open_error(path, e, direct))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| open_error(path, e, direct))?;
        match st.kind {
            FileKind::Regular | FileKind::BlockDevice => {}
            FileKind::Directory => {
                return Err(open_error(
                    path,
                    io::Error::from_raw_os_error(libc::EISDIR),
                    direct,
                ))
            }
            FileKind::Other => {
                return Err(BlockError::Invalid(format!(
                    "'{}' is neither a regular file nor a block device",
                    path.display()
                )))
            }
        }

        let locked = if opts.force_share {
            false
        } else {
            let (perm, shared) = image_lock::perms_for(read_only);
            lock_image(path, fd.as_fd(), perm, shared)?
        };

        let (request_alignment, mem_alignment) = if direct {
            probe_alignment(fd.as_fd(), st.kind)
        } else {
            (1, 1)
        };
        log::debug!(
            "opened '{}' ({:?}, {}, alignment {request_alignment}/{mem_alignment}, {})",
            path.display(),
            st.kind,
            if read_only { "read-only" } else { "read-write" },
            if locked { "locked" } else { "unlocked" }
        );
        let memory_backed = !direct && sys::is_memory_backed(fd.as_fd()).unwrap_or(false);
        if memory_backed {
            log::debug!(
                "'{}' is memory-backed: reads and writes run inline",
                path.display()
            );
        }
        Ok(FileDriver {
            memory_backed,
            pool_writes: AtomicUsize::new(0),
            write_lane: (!direct && st.kind == FileKind::Regular).then(runtime::Lane::new),
            fd: Arc::new(fd),
            path: path.to_owned(),
            kind: st.kind,
            read_only,
            direct,
            uring: opts.aio != AioMode::Threads,
            request_alignment,
            mem_alignment,
            locked,
            nowait_read: AtomicBool::new(!direct),
            nowait_write: AtomicBool::new(!direct),
            has_punch_hole: AtomicBool::new(true),
            has_zero_range: AtomicBool::new(true),
            page_cache_inconsistent: AtomicI32::new(0),
            counters: Counters::default(),
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether this open holds QEMU-style lock bytes on the image.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether the image is a block device (else a regular file).
    pub fn is_block_device(&self) -> bool {
        self.kind == FileKind::BlockDevice
    }

    /// Counters of the inline and thread-pool paths.
    pub fn stats(&self) -> FileStats {
        let c = &self.counters;
        FileStats {
            inline_reads: c.inline_reads.load(Ordering::Relaxed),
            inline_writes: c.inline_writes.load(Ordering::Relaxed),
            inline_misses: c.inline_misses.load(Ordering::Relaxed),
            pool_requests: c.pool_requests.load(Ordering::Relaxed),
            ring_requests: c.ring_requests.load(Ordering::Relaxed),
        }
    }

    /// Bytes allocated on disk (`st_blocks`), for tests of holes.
    pub fn allocated_bytes(&self) -> Result<u64> {
        Ok(sys::fstat(self.fd.as_fd())?.allocated)
    }

    /// Who else uses the image, as `(permissions used, permissions not shared)`.
    pub fn lock_holders(&self) -> Result<(Perm, Perm)> {
        Ok(image_lock::held_by_others(self.fd.as_fd())?)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// Runs a blocking syscall: on the thread pool when called from a coroutine (the coroutine
    /// yields until it is done), else right here. QEMU: `raw_thread_pool_submit()`.
    fn blocking<'a, R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'a) -> R {
        self.blocking_in(None, f)
    }

    /// [`Self::blocking`], in `lane` if given.
    fn blocking_in<'a, R: Send + 'static>(
        &self,
        lane: Option<&runtime::Lane>,
        f: impl FnOnce() -> R + Send + 'a,
    ) -> R {
        if runtime::in_coroutine() {
            bump(&self.counters.pool_requests);
            runtime::ThreadPool::global().submit_co_scoped_in(lane, f)
        } else {
            f()
        }
    }

    /// Whether writes go to the ring. Buffered writes of a regular file do not: the kernel
    /// cannot do them without blocking (ext4 refuses `RWF_NOWAIT` for them), so io_uring tries
    /// once, fails, and hands each to a worker of the *submitting thread's* io-wq — one per
    /// queue thread, so two queues write the inode from two workers at once, and each completion
    /// comes back as task work. The write lane does the same job with one worker for the whole
    /// file. Measured on ext4, 4k random buffered writes at QD32 (`scripts/aio-compare.sh`):
    /// the ring reached 0.75x the lane's IOPS with 2 queue threads and 0.53x with one, at
    /// 1.5-2x the CPU per request.
    pub(crate) fn ring_writes(&self) -> bool {
        self.uring && self.write_lane.is_none()
    }

    /// Whether reads go to the ring: not for a memory-backed file, whose big reads (the small
    /// ones run inline) go to the pool so that a second CPU copies while the queue thread reads
    /// the next request; io_uring would copy on the queue thread itself (tmpfs reads never
    /// block). Measured on tmpfs, 1M sequential reads: the ring 0.87x the pool.
    pub(crate) fn ring_reads(&self) -> bool {
        self.uring && !self.memory_backed
    }

    /// Runs `op` on the thread's ring if this file uses one: `None` when it does not, or the
    /// ring could not take the request (the caller then uses the pool). `EINTR` is retried.
    fn ring<R>(&self, mut op: impl FnMut() -> Option<io::Result<R>>) -> Option<io::Result<R>> {
        if !self.uring {
            return None;
        }
        loop {
            match op()? {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => {
                    bump(&self.counters.ring_requests);
                    return Some(r);
                }
            }
        }
    }

    /// Reads `buf` through the thread's ring, zeros past EOF as [`read_full`]; how many bytes
    /// are done (all of them, or fewer if the ring stopped taking requests: the rest is the
    /// caller's).
    fn ring_read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let off = offset + done as u64;
            let Some(r) = self.ring(|| runtime::uring::co_read(self.fd(), &mut buf[done..], off))
            else {
                return Ok(done);
            };
            match r {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if self.direct && done > 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                    break; // see read_full: the end of the file
                }
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(buf.len())
    }

    /// Writes `buf` through the thread's ring; how many bytes are done (see `ring_read`).
    fn ring_write(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let off = offset + done as u64;
            let Some(r) = self.ring(|| runtime::uring::co_write(self.fd(), &buf[done..], off))
            else {
                return Ok(done);
            };
            match r? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => done += n,
            }
        }
        Ok(done)
    }

    /// The inline attempt: `Some(n)` bytes done (possibly 0), `None` to go to the pool.
    fn try_nowait(&self, op: Op<'_>, offset: u64) -> Result<Option<usize>> {
        let (flag, res) = match op {
            Op::Read(buf) => (
                &self.nowait_read,
                sys::preadv2(self.fd(), buf, offset, RwFlags::NOWAIT),
            ),
            Op::Write(buf) => (
                &self.nowait_write,
                sys::pwritev2(self.fd(), buf, offset, RwFlags::NOWAIT),
            ),
        };
        match res {
            Ok(n) => Ok(Some(n)),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(None),
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                    flag.store(false, Ordering::Relaxed);
                    log::debug!("'{}': RWF_NOWAIT not supported ({e})", self.path.display());
                    Ok(None)
                }
                _ => Err(e.into()),
            },
        }
    }

    fn getlength_checked(&self) -> io::Result<u64> {
        match self.kind {
            FileKind::BlockDevice => sys::lseek(self.fd(), 0, Whence::End),
            _ => Ok(sys::fstat(self.fd())?.size),
        }
    }

    /// Writes `len` zero bytes from a zeroed buffer. QEMU: the `bdrv_co_do_pwrite_zeroes()`
    /// fallback when the driver has no fast path.
    #[cold]
    fn write_zeroes_slow(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = AlignedBuf::zeroed(len.min(CHUNK) as usize, self.mem_alignment as usize)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.co_pwritev(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// One `fallocate`, with "not supported" remembered in `flag`; `Ok(false)` = not supported.
    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: FallocMode,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let fd = self.fd();
        let res = match self.ring(|| runtime::uring::co_fallocate(fd, mode.bits(), offset, len)) {
            Some(res) => res,
            None => self.blocking(move || retry_eintr(|| sys::fallocate(fd, mode, offset, len))),
        };
        self.fallocate_result(flag, mode, res)
    }

    /// What a `fallocate` result means: done, not supported (remembered in `flag`), or an
    /// error. Shared by both engines.
    pub(crate) fn fallocate_result(
        &self,
        flag: &AtomicBool,
        mode: FallocMode,
        res: io::Result<()>,
    ) -> Result<bool> {
        match res {
            Ok(()) => Ok(true),
            Err(e) if not_supported(&e) => {
                flag.store(false, Ordering::Relaxed);
                log::debug!(
                    "'{}': fallocate({mode:?}) not supported: {e}",
                    self.path.display()
                );
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Why a request completed inline, for the trace.
    pub(crate) fn inline_why(&self) -> &'static str {
        if self.memory_backed {
            "memory-backed file"
        } else {
            "page-cache hit, RWF_NOWAIT"
        }
    }

    /// The inline part of a read, shared by both engines: a memory-backed file or an
    /// `RWF_NOWAIT` hit completes it; otherwise says how much is done and the rest goes to the
    /// thread pool.
    pub(crate) fn read_inline(&self, offset: u64, buf: &mut [u8]) -> Result<Inline> {
        if self.memory_backed && buf.len() <= INLINE_MAX {
            bump(&self.counters.inline_reads);
            read_full(self.fd(), buf, offset, false)?;
            return Ok(Inline::Done);
        }
        if !self.nowait_read.load(Ordering::Relaxed) {
            return Ok(Inline::Rest(0));
        }
        match self.try_nowait(Op::Read(buf), offset)? {
            Some(n) if n == buf.len() => {
                bump(&self.counters.inline_reads);
                Ok(Inline::Done)
            }
            // RWF_NOWAIT answers EAGAIN, never 0, when nothing is cached: 0 is EOF.
            Some(0) => {
                bump(&self.counters.inline_reads);
                buf.fill(0);
                Ok(Inline::Done)
            }
            Some(n) => {
                bump(&self.counters.inline_misses);
                Ok(Inline::Rest(n))
            }
            None => {
                bump(&self.counters.inline_misses);
                Ok(Inline::Rest(0))
            }
        }
    }

    /// The inline part of a write; see [`FileDriver::read_inline`].
    pub(crate) fn write_inline(&self, offset: u64, buf: &[u8]) -> Result<Inline> {
        self.check_writable()?;
        if self.memory_backed
            && buf.len() <= INLINE_MAX
            && self.pool_writes.load(Ordering::Relaxed) == 0
        {
            bump(&self.counters.inline_writes);
            write_full(self.fd(), buf, offset)?;
            return Ok(Inline::Done);
        }
        if !self.nowait_write.load(Ordering::Relaxed) {
            return Ok(Inline::Rest(0));
        }
        match self.try_nowait(Op::Write(buf), offset)? {
            Some(n) if n == buf.len() => {
                bump(&self.counters.inline_writes);
                Ok(Inline::Done)
            }
            Some(n) => {
                bump(&self.counters.inline_misses);
                Ok(Inline::Rest(n))
            }
            None => {
                bump(&self.counters.inline_misses);
                Ok(Inline::Rest(0))
            }
        }
    }

    /// Before an `fdatasync`: `Ok(false)` if there is nothing to flush, the remembered error
    /// if an earlier one failed.
    pub(crate) fn flush_needed(&self) -> Result<bool> {
        if self.read_only {
            return Ok(false); // as bdrv_co_flush(): nothing of ours to make durable
        }
        let poisoned = self.page_cache_inconsistent.load(Ordering::Relaxed);
        if poisoned != 0 {
            return Err(io::Error::from_raw_os_error(poisoned).into());
        }
        Ok(true)
    }

    /// After an `fdatasync`: a failure in writeback mode poisons later flushes.
    pub(crate) fn flush_result(&self, res: io::Result<()>) -> Result<()> {
        if let Err(e) = &res {
            if !self.direct {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.page_cache_inconsistent.store(errno, Ordering::Relaxed);
            }
        }
        Ok(res?)
    }
}

/// How far the inline attempt got.
pub(crate) enum Inline {
    Done,
    /// This many bytes are done; the rest needs the thread pool.
    Rest(usize),
}

enum Op<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// QEMU's `translate_err()`: the errnos that mean "this file/device cannot do that".
fn not_supported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::ENODEV | libc::EINVAL)
    )
}

pub(crate) fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Reads all of `buf`, filling what lies beyond EOF with zeros. QEMU:
/// `handle_aiocb_rw_linear()` plus the `iov_memset()` of `handle_aiocb_rw()`.
pub(crate) fn read_full(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
    direct: bool,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match sys::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // After a short O_DIRECT read at EOF the next offset is unaligned: the kernel says
            // EINVAL, which here means "end of file", as in QEMU.
            Err(e) if direct && done > 0 && e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

pub(crate) fn write_full(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match sys::pwrite(fd, &buf[done..], offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An open error that names the file and says what went wrong in words.
fn open_error(path: &Path, e: io::Error, direct: bool) -> BlockError {
    if direct && e.raw_os_error() == Some(libc::EINVAL) {
        return BlockError::Invalid(format!(
            "cannot open '{}' with O_DIRECT (cache=none): the filesystem does not support it",
            path.display()
        ));
    }
    BlockError::Open {
        path: path.to_owned(),
        source: e,
    }
}

fn lock_image(path: &Path, fd: BorrowedFd<'_>, perm: Perm, shared: Perm) -> Result<bool> {
    image_lock::lock(fd, perm, shared).map_err(|e| match e {
        LockError::Conflict(detail) => BlockError::Locked {
            path: path.to_owned(),
            detail,
        },
        LockError::Io(e) => BlockError::Open {
            path: path.to_owned(),
            source: e,
        },
    })
}

/// `(request alignment, memory alignment)` for O_DIRECT. QEMU: `raw_probe_alignment()`.
fn probe_alignment(fd: BorrowedFd<'_>, kind: FileKind) -> (u64, u64) {
    const MAX_ALIGN: usize = 4096;
    let valid = |a: u64| a.is_power_of_two() && a <= 1 << 20;
    if kind == FileKind::BlockDevice {
        if let Ok(bs) = sys::logical_block_size(fd) {
            let bs = u64::from(bs);
            if valid(bs) {
                return (bs, bs);
            }
        }
    }
    if let Ok(Some((mem, off))) = sys::dio_alignment(fd) {
        let (mem, off) = (u64::from(mem).max(1), u64::from(off));
        if valid(mem) && valid(off) {
            return (off, mem);
        }
    }
    // The kernel would not say: probe with reads. EINVAL means "misaligned"; any other outcome
    // (data, EOF, another error) means the alignment was accepted. QEMU: `raw_is_io_aligned()`.
    let accepted =
        |r: io::Result<usize>| !matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
    let Ok(mut buf) = AlignedBuf::zeroed(2 * MAX_ALIGN, MAX_ALIGN) else {
        return (MAX_ALIGN as u64, MAX_ALIGN as u64);
    };
    let mut mem_align = MAX_ALIGN;
    let mut a = 512;
    while a <= MAX_ALIGN {
        // The buffer starts exactly `a` bytes past a MAX_ALIGN boundary: aligned to `a`, no more.
        if accepted(sys::pread(fd, &mut buf[a..a + MAX_ALIGN], 0)) {
            mem_align = a;
            break;
        }
        a *= 2;
    }
    let mut request = MAX_ALIGN;
    let mut a = 512;
    while a <= MAX_ALIGN {
        if accepted(sys::pread(fd, &mut buf[..a], 0)) {
            request = a;
            break;
        }
        a *= 2;
    }
    (request as u64, mem_align as u64)
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        if self.kind == FileKind::BlockDevice {
            "host_device"
        } else {
            "file"
        }
    }

    fn getlength(&self) -> u64 {
        match self.getlength_checked() {
            Ok(len) => len,
            Err(e) => {
                log::error!("'{}': cannot get the size: {e}", self.path.display());
                0
            }
        }
    }

    fn request_alignment(&self) -> u64 {
        self.request_alignment
    }

    fn min_mem_alignment(&self) -> u64 {
        self.mem_alignment
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = match self.read_inline(offset, buf)? {
            Inline::Done => {
                log::trace!(
                    "file: read {} bytes at {offset}: done inline, no yield ({})",
                    buf.len(),
                    self.inline_why()
                );
                return Ok(());
            }
            Inline::Rest(n) => n,
        };
        let (fd, direct) = (self.fd(), self.direct);
        if self.ring_reads() && runtime::in_coroutine() {
            log::trace!(
                "file: read {} bytes at {}: not inline ({}); to the ring",
                buf.len() - done,
                offset + done as u64,
                if direct {
                    "O_DIRECT"
                } else {
                    "page-cache miss"
                }
            );
            done += self.ring_read(&mut buf[done..], offset + done as u64)?;
            if done == buf.len() {
                return Ok(());
            }
        }
        let rest = &mut buf[done..];
        let off = offset + done as u64;
        log::trace!("file: read {} bytes at {off}: blocking syscall", rest.len());
        Ok(self.blocking(move || read_full(fd, rest, off, direct))?)
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut done = match self.write_inline(offset, buf)? {
            Inline::Done => {
                log::trace!(
                    "file: write {} bytes at {offset}: done inline, no yield ({})",
                    buf.len(),
                    self.inline_why()
                );
                return Ok(());
            }
            Inline::Rest(n) => n,
        };
        let fd = self.fd();
        let _busy = PoolWrite::enter(&self.pool_writes);
        if self.ring_writes() && runtime::in_coroutine() {
            log::trace!(
                "file: write {} bytes at {}: not inline ({}); to the ring",
                buf.len() - done,
                offset + done as u64,
                if self.direct {
                    "O_DIRECT"
                } else {
                    "would block"
                }
            );
            done += self.ring_write(&buf[done..], offset + done as u64)?;
            if done == buf.len() {
                return Ok(());
            }
        }
        let rest = &buf[done..];
        let off = offset + done as u64;
        log::trace!(
            "file: write {} bytes at {off}: blocking syscall{}",
            rest.len(),
            if self.write_lane.is_some() {
                " (the file's write lane)"
            } else {
                ""
            }
        );
        Ok(self.blocking_in(self.write_lane.as_ref(), move || write_full(fd, rest, off))?)
    }

    fn co_flush(&self) -> Result<()> {
        if !self.flush_needed()? {
            return Ok(());
        }
        let fd = self.fd();
        let res = match self.ring(|| runtime::uring::co_fsync(fd, true)) {
            Some(res) => res,
            None => self.blocking(move || retry_eintr(|| sys::fdatasync(fd))),
        };
        self.flush_result(res)
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap
            && self.try_fallocate(&self.has_punch_hole, FallocMode::PunchHole, offset, len)?
        {
            return Ok(());
        }
        if self.try_fallocate(&self.has_zero_range, FallocMode::ZeroRange, offset, len)? {
            return Ok(());
        }
        self.write_zeroes_slow(offset, len)
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if self.try_fallocate(&self.has_punch_hole, FallocMode::PunchHole, offset, len)? {
            Ok(())
        } else {
            Err(BlockError::NotSupported("discard (fallocate PUNCH_HOLE)"))
        }
    }

    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        if self.kind == FileKind::BlockDevice || len == 0 {
            return Ok((BlockStatus::Data, len.max(1)));
        }
        // QEMU: find_allocation(). SEEK_DATA first: where does the next data start?
        let data = match sys::lseek(self.fd(), offset, Whence::Data) {
            Ok(d) => d,
            // No data at or after `offset` (or `offset` is past EOF): zeros to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((BlockStatus::Zero, len)),
            // No SEEK_DATA support: everything is data.
            Err(_) => return Ok((BlockStatus::Data, len)),
        };
        if data > offset {
            return Ok((BlockStatus::Zero, (data - offset).min(len)));
        }
        if data < offset {
            return Ok((BlockStatus::Data, len)); // the kernel went backwards: don't trust it
        }
        match sys::lseek(self.fd(), offset, Whence::Hole) {
            Ok(hole) if hole > offset => Ok((BlockStatus::Data, (hole - offset).min(len))),
            _ => Ok((BlockStatus::Data, len)),
        }
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        if self.kind == FileKind::BlockDevice {
            let len = self.getlength_checked()?;
            if size == len {
                return Ok(());
            }
            return Err(BlockError::NotSupported("resizing a block device"));
        }
        let fd = self.fd();
        Ok(self.blocking(move || retry_eintr(|| sys::ftruncate(fd, size)))?)
    }

    fn close(&self) -> Result<()> {
        self.co_flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_read_fills_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("short.img");
        std::fs::write(&path, b"hello").expect("write");
        let f = FileDriver::open(&path, &FileOptions::default()).expect("open");
        let mut buf = [0xffu8; 16];
        f.co_preadv(0, &mut buf)
            .expect("read outside a coroutine runs inline");
        assert_eq!(&buf[..5], b"hello");
        assert!(buf[5..].iter().all(|&b| b == 0));
        assert_eq!(f.getlength(), 5);
        assert_eq!(f.format_name(), "file");
    }

    #[test]
    fn force_share_is_read_only_and_unlocked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.img");
        std::fs::write(&path, [0u8; 512]).expect("write");
        let opts = FileOptions {
            force_share: true,
            ..FileOptions::default()
        };
        let f = FileDriver::open(&path, &opts).expect("open");
        assert!(f.is_read_only());
        assert!(!f.is_locked());
        assert!(matches!(f.co_pwritev(0, b"x"), Err(BlockError::ReadOnly)));
    }
}
