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
//!                           │          (blkdebug: an error-injecting filter, for tests;
//!                           │           blklogwrites: a write-logging filter, for tests)
//!                           ▼
//!                    protocol driver   file (preadv/pwritev inline or on the thread pool)
//! ```
//!
//! Every `co_` method may yield: call it from a coroutine. Drivers are `Send + Sync` because one
//! image is shared by all queue threads; state that needs a lock across a yield uses
//! `runtime::CoMutex`.
//!
//! The async engine (`--engine async`) is a sibling, [`async_engine`]: the `*_async` forms of
//! `BlockBackend`'s requests and of the `file` driver's blocking operations, and the enum
//! dispatch that reaches `file` and `null` through `raw` windows without a trait object. The
//! [`BlockDriver`] trait names neither the async engine nor any concrete driver (its I/O methods
//! are the coroutine engine's `co_` ones); the async engine finds its way down a stack through
//! [`BlockDriver::window`] (raw) and recognises its leaves by their type.
//!
//! # Example: open an image and read it from a coroutine
//!
//! ```
//! use block::{open_image, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.img");
//! std::fs::write(&path, b"hello, block layer")?;
//!
//! let blk = open_image(&path, &OpenOptions::default())?; // raw, read-write, locked
//! let reader = blk.clone();
//! let data = runtime::spawn(move || {
//!     let mut buf = vec![0; 5];
//!     // May yield while io_uring or a pool worker reads. Here it usually does not: the file
//!     // was just written, so the read is served inline from the page cache
//!     // (`preadv2(RWF_NOWAIT)`, or a plain read if the file is in memory), and the coroutine
//!     // runs to its end inside `spawn`. A yield would change nothing below: `join` polls.
//!     reader.co_pread(0, &mut buf).map(|()| buf)
//! })
//! .join() // QEMU's co_wrapper: run in a coroutine, poll this thread's loop until it is done
//! .expect("the coroutine panicked")?;
//! assert_eq!(data, b"hello");
//! blk.close()?; // flush
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Where things live
//!
//! | module | QEMU | owns |
//! |---|---|---|
//! | [`backend`] | `block/block-backend.c`, `block/io.c` | `BlockBackend`: checks, alignment, in-flight, drain |
//! | [`file`](mod@file) | `block/file-posix.c` | the `file` protocol driver |
//! | [`image_lock`] | `block/file-posix.c` (lock bytes) | QEMU-compatible image locking |
//! | [`raw`] | `block/raw-format.c` | the `raw` format, with an offset/size window |
//! | [`qcow2`] | `block/qcow2*.c` | the `qcow2` format: reads, writes, backing chains, internal snapshots kept intact |
//! | [`vmdk`] | `block/vmdk.c` | the `vmdk` format, read-only: sparse, flat, split and stream-optimized disks |
//! | [`chain`] | `block/io.c` `bdrv_co_common_block_status_above()` | block status through a backing chain |
//! | [`null`] | `block/null.c` | `null-co`: zeros in, nothing out |
//! | [`nbd`] (`nbd/`) | `block/nbd.c`, `nbd/client.c` | the `nbd` protocol driver: a remote image over TCP or a Unix socket, many requests in flight, reconnect |
//! | [`readonly`] | `block.c` `bdrv_apply_auto_read_only()` | the read-only formats: the `-r` rule, opening them by name, the shared read path |
//! | [`vdi`] | `block/vdi.c` | the `vdi` format (VirtualBox), read-only |
//! | [`vpc`] | `block/vpc.c` | the `vpc` format (VHD: fixed, dynamic), read-only |
//! | [`vhdx`] | `block/vhdx*.c` | the `vhdx` format (fixed, dynamic, differencing), read-only |
//! | [`overlay`] | `block.c` `bdrv_append_temp_snapshot()` | `--snapshot`/`--overlay`: a qcow2 overlay over a read-only image |
//! | [`blkdebug`] | `block/blkdebug.c` | error injection for tests |
//! | [`blklogwrites`] | `block/blklogwrites.c` | a log of every write and flush, for crash-consistency tests |
//! | [`partition`] | none (Linux `block/partitions/{msdos,efi}.c`) | MBR and GPT partition tables as byte windows |
//! | [`probe`] | `block.c` `bdrv_probe_all()`, each driver's `bdrv_probe` | image format detection |
//! | `sys` (private) | the syscalls of the above | every `unsafe` of the crate |
//! | [`async_engine`] (`async_engine/`) | none (the async counterpart of `block/block-backend.c`, `block/io.c` and `block/file-posix.c`'s `co_` paths) | the async engine: `AsyncLeaf`/`AsyncPath` (`mod.rs`), `BlockBackend::*_async` (`backend.rs`), `FileDriver`'s async forms (`file.rs`); qcow2 and the rest through the coroutine bridge |

pub mod async_engine;
pub mod backend;
pub mod blkdebug;
pub mod blklogwrites;
pub mod chain;
pub mod file;
#[doc(hidden)]
pub mod fuzzing;
pub mod image_lock;
pub mod nbd;
pub mod null;
pub mod overlay;
pub mod partition;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod readonly;
mod sys;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use std::any::Any;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use async_engine::{AsyncLeaf, AsyncPath};
pub use backend::{BackendOptions, BlockBackend, DetectZeroes, Discard};
pub use blkdebug::{BlkdebugDriver, BlkdebugOp, Gate, Rule, RuleId};
pub use blklogwrites::{BlklogwritesDriver, LoggedOp};
pub use file::{is_in_memory, AioMode, CacheMode, FileDriver, FileOptions, FileStats};
pub use image_lock::Perm;
pub use nbd::{open_nbd, NbdDriver, NbdOptions, DEFAULT_REPLY_TIMEOUT};
pub use null::{NullDriver, NullLatency};
pub use qcow2::{Qcow2Driver, Qcow2Options};
pub use raw::{RawDriver, RawOptions};
pub use sys::AlignedBuf;
pub use vmdk::VmdkDriver;

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
    /// The image file could not be opened (missing, a directory, permission denied …).
    Open { path: PathBuf, source: io::Error },
    /// Another process (QEMU, qemu-img, another coro-fuse) uses the image in a conflicting way;
    /// `detail` is QEMU's wording, e.g. `Failed to get shared "write" lock`.
    Locked { path: PathBuf, detail: String },
    /// The image is in a format this build cannot read (yet).
    UnsupportedFormat { path: PathBuf, format: &'static str },
    /// The backing chain of `image` cannot be opened; `source` names the backing file.
    Backing {
        image: PathBuf,
        source: Box<BlockError>,
    },
    /// A writable open of an image in a format this build can only read; the message names
    /// `-r` and `--snapshot`/`--overlay` ([`readonly::require_read_only`]).
    ReadOnlyFormat { path: PathBuf, format: &'static str },
    /// A write was refused to protect the image, e.g. one that would make a probed raw image
    /// look like another format (QEMU: `-EPERM` from `raw_co_pwritev()`).
    Refused(String),
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
            BlockError::Open { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BlockError::Locked { .. } => libc::EAGAIN,
            BlockError::UnsupportedFormat { .. } => libc::EMEDIUMTYPE,
            BlockError::Backing { source, .. } => source.errno(),
            BlockError::Refused(_) => libc::EPERM,
            BlockError::ReadOnlyFormat { .. } => libc::EROFS,
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
            BlockError::Open { path, source } => {
                let path = path.display();
                match source.raw_os_error() {
                    Some(libc::ENOENT) => write!(f, "cannot open '{path}': no such file"),
                    Some(libc::EISDIR) => write!(f, "cannot open '{path}': is a directory"),
                    Some(libc::EACCES | libc::EPERM) => {
                        write!(f, "cannot open '{path}': permission denied")
                    }
                    Some(libc::EROFS) => write!(
                        f,
                        "cannot open '{path}' for writing: read-only file system (open it read-only)"
                    ),
                    _ => write!(f, "cannot open '{path}': {source}"),
                }
            }
            BlockError::Locked { path, detail } => write!(
                f,
                "'{}': image is locked by another process (qemu or coro-fuse); use \
                 -U/--force-share to open it read-only without locking ({detail})",
                path.display()
            ),
            BlockError::UnsupportedFormat { path, format } => write!(
                f,
                "'{}' is a {format} image; this format is not supported yet",
                path.display()
            ),
            BlockError::Backing { image, source } => match &**source {
                // Our own refusals need no "invalid request" prefix.
                BlockError::Invalid(why) => {
                    write!(f, "'{}': backing file: {why}", image.display())
                }
                e => write!(f, "'{}': backing file: {e}", image.display()),
            },
            BlockError::Refused(why) => write!(f, "not permitted: {why}"),
            BlockError::ReadOnlyFormat { path, format } => write!(
                f,
                "'{}' is a {format} image, which can only be read: pass -r (--read-only) to \
                 export it read-only, or --snapshot (or --overlay FILE) to send writes to a \
                 qcow2 overlay",
                path.display()
            ),
        }
    }
}

impl std::error::Error for BlockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BlockError::Io(e) | BlockError::Open { source: e, .. } => Some(e),
            BlockError::Backing { source, .. } => Some(&**source),
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

/// What a node that forwards every request to one child, shifted by a fixed offset, does to
/// them (a `raw` window): see [`BlockDriver::window`].
#[derive(Clone, Copy)]
pub struct Window<'a> {
    /// The node every request goes on to.
    pub child: &'a dyn BlockDriver,
    /// Added to every offset on the way down.
    pub offset: u64,
    /// The first `guard` bytes of the child (0: none) are checked by the node itself: a write,
    /// write-zeroes or discard that touches them must go through the node, not around it.
    pub guard: u64,
}

/// A block driver: a format (raw, qcow2, null) or protocol (file) node.
///
/// QEMU: `BlockDriver` in `include/block/block_int-common.h`. All offsets are bytes; requests
/// reach a driver already aligned to [`BlockDriver::request_alignment`], with buffers aligned to
/// [`BlockDriver::min_mem_alignment`], and inside [`BlockDriver::getlength`] rounded up to the
/// request alignment (the backend checks and pads), except `co_truncate`. A read of the padding
/// past the end returns zeros.
///
/// `Any` lets a caller ask a node's concrete type (as `&dyn Any`): the async engine recognises
/// the leaves it drives natively that way ([`AsyncLeaf`]), so this trait need not name them.
pub trait BlockDriver: Any + Send + Sync {
    /// The driver's name as `qemu-img info` would print it ("raw", "qcow2", "null", "file").
    fn format_name(&self) -> &'static str;

    /// Current size in bytes. QEMU: `bdrv_getlength()`.
    fn getlength(&self) -> u64;

    /// Required alignment of offsets and lengths (1 unless O_DIRECT or a format needs more).
    fn request_alignment(&self) -> u64 {
        1
    }

    /// Required alignment of buffer addresses (1 unless O_DIRECT). QEMU:
    /// `BlockLimits::min_mem_alignment`.
    fn min_mem_alignment(&self) -> u64 {
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

    /// Changes the size; growing makes the new range read as zeros. A size that is not a
    /// multiple of [`BlockDriver::size_granularity`] is [`BlockError::Invalid`]. QEMU:
    /// `bdrv_co_truncate`.
    fn co_truncate(&self, size: u64) -> Result<()>;

    /// Every size this node can have and keep across a close and reopen is a multiple of this
    /// (≥ 1): 512 for a format that stores its size in sectors, as QEMU reads qcow2's; 1 for a
    /// raw file, whose size is the file's. Filters return their child's. QEMU:
    /// `BDRV_SECTOR_SIZE` (QEMU rounds every node to sectors; we do so only where the format
    /// would otherwise lose bytes at a reopen).
    fn size_granularity(&self) -> u64 {
        1
    }

    /// Flushes and releases resources before the process exits. QEMU: `bdrv_close`.
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The node that ranges reported [`BlockStatus::Unallocated`] read from (a qcow2 image's
    /// backing file); filters return their child's. [`chain::co_block_status_above`] walks it.
    /// QEMU: `bdrv_filter_or_cow_bs()`.
    fn backing_node(&self) -> Option<&dyn BlockDriver> {
        None
    }

    /// If this node passes every read, write, flush, write-zeroes, discard and block-status
    /// query to one child unchanged but for a fixed shift of the offset (a `raw` window), the
    /// child and the shift; `None` (the default) if it does work of its own. The node's size
    /// and truncation stay its own, and so do changes of the `guard` range. A caller may skip
    /// such a node: the async engine does, to reach a leaf it drives natively
    /// ([`AsyncPath::of`]). QEMU: `raw_adjust_offset()` of `block/raw-format.c`.
    fn window(&self) -> Option<Window<'_>> {
        None
    }
}

/// Which format driver [`open_image`] puts on top of the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `raw` over `file`.
    Raw,
    /// `null-co` (no file; `OpenOptions::size` bytes of zeros, 1 GiB by default).
    Null,
    /// `qcow2` over `file` ([`Qcow2Driver`]).
    Qcow2,
    /// `vdi` over `file`, read-only ([`vdi::VdiDriver`]).
    Vdi,
    /// `vpc` (VHD) over `file`, read-only ([`vpc::VpcDriver`]).
    Vpc,
    /// `vhdx` over `file`, read-only, with a differencing image's parent ([`vhdx::VhdxDriver`]).
    Vhdx,
    /// `vmdk` over `file` and its extent files, read-only ([`VmdkDriver`]).
    Vmdk,
    /// Look at the first bytes ([`probe`]): qcow2, vdi, vpc, vhdx, vmdk by their magic (the
    /// read-only ones under [`readonly::require_read_only`]), raw unless they are another
    /// format's magic, which is refused with [`BlockError::UnsupportedFormat`]. A raw image
    /// found this way is *probed*: writes that would make its first sector look like another
    /// format are refused ([`RawDriver::mark_probed`]).
    #[default]
    Auto,
}

impl Format {
    /// The name of a read-only format ([`readonly`]), `None` for the others.
    pub fn read_only_name(self) -> Option<&'static str> {
        match self {
            Format::Vdi => Some("vdi"),
            Format::Vpc => Some("vpc"),
            Format::Vhdx => Some("vhdx"),
            Format::Vmdk => Some("vmdk"),
            _ => None,
        }
    }
}

/// Options of [`open_image`]: the union of the file, raw and backend options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    pub format: Format,
    pub read_only: bool,
    pub cache: CacheMode,
    /// How the file's blocking I/O is done (QEMU `aio=`).
    pub aio: AioMode,
    /// No image locking (QEMU `-U`); implies `read_only`.
    pub force_share: bool,
    /// No locking of the backing files only (an overlay's `-U`, see [`overlay`]): the top
    /// image is locked and may be writable.
    pub backing_force_share: bool,
    /// Raw window: start of the exported range in the file.
    pub offset: u64,
    /// Raw window: length of the exported range (default: to the end of the file). For
    /// [`Format::Null`], the size of the null device.
    pub size: Option<u64>,
    /// qcow2 cache sizes.
    pub qcow2: Qcow2Options,
    /// QEMU `discard=` of the exported node (default `unmap`, as `qemu-img`/`qemu-io`; the
    /// command line's default is `ignore`, as `-blockdev`).
    pub discard: Discard,
    /// QEMU `detect-zeroes=` of the exported node (default `off`).
    pub detect_zeroes: DetectZeroes,
    /// [`Format::Null`]: how long each request waits (QEMU `latency-ns`; default inline).
    /// Refused with any other format.
    pub null_latency: NullLatency,
}

/// QEMU's `null-co` default size.
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// Opens an image the way the CLI does: `file` (locked, possibly O_DIRECT) → format probe →
/// `raw` (with the window) → `BlockBackend`. Call it outside a coroutine; its I/O (the probe)
/// runs on the calling thread. Errors name the file.
///
/// QEMU: `blk_new_open()` / `bdrv_open()` with `driver=raw,file.driver=file`.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<BlockBackend>> {
    open_image_with(path, opts, &[])
}

/// [`open_image`] with error-injection rules: when `inject` is not empty, a
/// [`BlkdebugDriver`] with these rules sits between the backend and the format driver.
pub fn open_image_with(
    path: &Path,
    opts: &OpenOptions,
    inject: &[Rule],
) -> Result<Arc<BlockBackend>> {
    let debug = |d: Arc<dyn BlockDriver>| -> Arc<dyn BlockDriver> {
        if inject.is_empty() {
            return d;
        }
        let dbg = BlkdebugDriver::new(d);
        for r in inject {
            dbg.add_rule(r.clone());
        }
        Arc::new(dbg)
    };
    let read_only = opts.read_only || opts.force_share;
    let backend_opts = BackendOptions {
        read_only,
        write_beyond_eof: false,
        discard: opts.discard,
        detect_zeroes: opts.detect_zeroes,
    };
    if opts.detect_zeroes == DetectZeroes::Unmap && opts.discard == Discard::Ignore {
        log::warn!(
            "detect-zeroes=unmap without discard=unmap: detected zeros are written as zeros \
             but not deallocated (as detect-zeroes=on)"
        );
    }
    if opts.format == Format::Null {
        if opts.offset != 0 {
            return Err(BlockError::Invalid(
                "the null driver has no offset option".into(),
            ));
        }
        let size = opts.size.unwrap_or(NULL_DEFAULT_SIZE);
        let null = NullDriver::with_latency(size, read_only, opts.null_latency);
        return Ok(Arc::new(BlockBackend::new(
            debug(Arc::new(null)),
            backend_opts,
        )?));
    }

    if opts.null_latency != NullLatency::Inline {
        return Err(BlockError::Invalid(
            "a latency is an option of the null driver only".into(),
        ));
    }
    let file_opts = FileOptions {
        read_only,
        cache: opts.cache,
        aio: opts.aio,
        force_share: opts.force_share,
    };
    let file: Arc<dyn BlockDriver> = Arc::new(FileDriver::open(path, &file_opts)?);
    let mut format = opts.format;
    let mut probed_raw = false;
    if format == Format::Auto {
        match probe::probe(&file)? {
            Some("qcow2") => format = Format::Qcow2,
            Some(f) if readonly::is_read_only_format(f) => {
                return open_read_only(path, file, f, opts, backend_opts, debug)
            }
            Some(format) => {
                return Err(BlockError::UnsupportedFormat {
                    path: path.to_owned(),
                    format,
                })
            }
            None => probed_raw = true,
        }
    }
    if let Some(name) = format.read_only_name() {
        return open_read_only(path, file, name, opts, backend_opts, debug);
    }
    if format == Format::Qcow2 {
        let qcow2 = open_qcow2(path, file, opts, read_only)?;
        return Ok(Arc::new(BlockBackend::new(
            debug(Arc::new(qcow2)),
            backend_opts,
        )?));
    }
    let raw = RawDriver::new(
        file,
        RawOptions {
            offset: opts.offset,
            size: opts.size,
        },
    )
    .map_err(|e| match e {
        BlockError::Invalid(why) => BlockError::Invalid(format!("'{}': {why}", path.display())),
        e => e,
    })?;
    let raw = if probed_raw {
        if !read_only {
            log::info!(
                "the format of '{}' was not given and probing guessed raw: writes that would \
                 make its first sector look like another format are refused (pass -f raw to \
                 remove the restriction)",
                path.display()
            );
        }
        raw.mark_probed()
    } else {
        raw
    };
    Ok(Arc::new(BlockBackend::new(
        debug(Arc::new(raw)),
        backend_opts,
    )?))
}

/// The read-only formats' part of [`open_image_with`]: the `-r` rule
/// ([`readonly::require_read_only`]), no raw window, the driver (and a vhdx parent chain).
fn open_read_only(
    path: &Path,
    file: Arc<dyn BlockDriver>,
    format: &'static str,
    opts: &OpenOptions,
    backend_opts: BackendOptions,
    debug: impl Fn(Arc<dyn BlockDriver>) -> Arc<dyn BlockDriver>,
) -> Result<Arc<BlockBackend>> {
    readonly::require_read_only(path, format, file.is_read_only())?;
    if opts.offset != 0 || opts.size.is_some() {
        return Err(BlockError::Invalid(format!(
            "'{}': the offset and size options apply to raw images only",
            path.display()
        )));
    }
    let chain = qcow2::ChainOptions {
        cache: opts.cache,
        aio: opts.aio,
        force_share: opts.force_share || opts.backing_force_share,
        qcow2: opts.qcow2,
    };
    let mut seen: Vec<readonly::FileId> = readonly::file_id(path).into_iter().collect();
    let node = readonly::open_node(format, file, path, &chain, &mut seen).unwrap_or_else(|| {
        Err(BlockError::Invalid(format!(
            "{format}: not a read-only format"
        )))
    })?;
    Ok(Arc::new(BlockBackend::new(debug(node), backend_opts)?))
}

/// The qcow2 part of [`open_image_with`]: refuses the raw-only options, opens the backing chain
/// (read-only, with the image's cache mode and force-share), and names the file in errors. The
/// driver is writable when the file is.
fn open_qcow2(
    path: &Path,
    file: Arc<dyn BlockDriver>,
    opts: &OpenOptions,
    read_only: bool,
) -> Result<Qcow2Driver> {
    debug_assert_eq!(read_only, file.is_read_only());
    if opts.offset != 0 || opts.size.is_some() {
        let e = BlockError::Invalid("the offset and size options apply to raw images only".into());
        return Err(qcow2::name_error(path, e));
    }
    let chain = qcow2::ChainOptions {
        cache: opts.cache,
        aio: opts.aio,
        force_share: opts.force_share || opts.backing_force_share,
        qcow2: opts.qcow2,
    };
    Qcow2Driver::open_chain(file, path, &chain).map_err(|e| qcow2::name_error(path, e))
}
