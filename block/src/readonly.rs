//! What the read-only image formats (`vdi`, `vpc`, `vhdx`, `vmdk`) share: the rule for opening them
//! without `-r`, the one place that opens them by name (for [`crate::open_image`], a qcow2
//! overlay's backing file and a vhdx differencing image's parent), bounds-checked reads of the
//! image file, and the read loop over a block map.
//!
//! QEMU: `bdrv_apply_auto_read_only()` in `block.c` (a driver that cannot write refuses a
//! writable open unless `auto-read-only` is set), and the `bdrv_co_preadv` loops of
//! `block/vdi.c`, `block/vpc.c` and `block/vhdx.c`.
//!
//! # Read-only formats without `-r`
//!
//! These drivers cannot write. A writable open of such an image is refused with
//! [`BlockError::ReadOnlyFormat`], whose message names both ways out: `-r` (export it read-only)
//! or `--snapshot`/`--overlay` (send writes to a qcow2 overlay whose backing file is the image).
//! We refuse instead of quietly exporting read-only, as `qemu-storage-daemon` refuses
//! `read-only=off` for QEMU's read-only `dmg` driver: a tool that was asked for a writable
//! disk and returns one that fails every write later (mkfs half-way, a VM's first write) is
//! worse than one that says so at the start. [`require_read_only`] is the rule; every
//! read-only driver opened by [`crate::open_image`] goes through it.
//!
//! # The read path
//!
//! Each driver turns a guest offset into an [`Extent`] run (its block map is in memory, loaded
//! at open): data at a host offset, zeros, or "below" (the parent of a differencing image).
//! [`co_read_extents`] does the I/O; [`HostFile`] refuses to read outside the file, so a map
//! entry pointing past the end is an EIO with a log line, never a short read taken for data.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{BackendOptions, BlockBackend};
use crate::qcow2::ChainOptions;
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// The formats this module opens, by the name [`crate::probe`] and qcow2's backing format
/// extension use.
pub const FORMATS: &[&str] = &["vdi", "vpc", "vhdx", "vmdk"];

/// Whether `format` is one of the read-only formats.
pub fn is_read_only_format(format: &str) -> bool {
    FORMATS.contains(&format)
}

/// The rule for a format that can only be read: a writable open is refused, naming `-r` and
/// `--snapshot`/`--overlay` (see the module doc).
pub fn require_read_only(path: &Path, format: &'static str, read_only: bool) -> Result<()> {
    if read_only {
        return Ok(());
    }
    Err(BlockError::ReadOnlyFormat {
        path: path.to_owned(),
        format,
    })
}

/// Identity of an image file in a chain: (device, inode), for loop detection.
pub(crate) type FileId = (u64, u64);

/// The identity of `path`, if it can be looked at.
pub(crate) fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens a read-only format driver named `format` over `file` (a read-only file node).
/// `path` is where the file was opened from (a vhdx parent's relative path resolves against
/// it); `seen` lists the files already in the chain. `None` if `format` is not one of
/// [`FORMATS`]. Errors name the file.
pub(crate) fn open_node(
    format: &str,
    file: Arc<dyn BlockDriver>,
    path: &Path,
    chain: &ChainOptions,
    seen: &mut Vec<FileId>,
) -> Option<Result<Arc<dyn BlockDriver>>> {
    let node: Result<Arc<dyn BlockDriver>> = match format {
        "vdi" => crate::vdi::VdiDriver::open(file).map(|d| Arc::new(d) as _),
        "vpc" => crate::vpc::VpcDriver::open(file).map(|d| Arc::new(d) as _),
        "vhdx" => {
            crate::vhdx::VhdxDriver::open_chain(file, path, chain, seen).map(|d| Arc::new(d) as _)
        }
        // Its extent files are opened beside `path`, read-only, as the image file was.
        "vmdk" => {
            let extents = crate::FileOptions {
                read_only: true,
                cache: chain.cache,
                aio: chain.aio,
                force_share: chain.force_share,
            };
            crate::vmdk::VmdkDriver::open(file, path, &extents).map(|d| Arc::new(d) as _)
        }
        _ => return None,
    };
    Some(node.map_err(|e| crate::qcow2::name_error(path, e)))
}

/// What a run of guest bytes reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Host bytes at this offset of the image file (the run is contiguous there).
    Data(u64),
    /// Zeros.
    Zero,
    /// The layer below (a differencing image's parent; zeros without one).
    Below,
}

impl Extent {
    /// The block status of the extent: `Below` is [`BlockStatus::Unallocated`] (the chain
    /// walk looks below).
    pub(crate) fn status(self) -> BlockStatus {
        match self {
            Extent::Data(_) => BlockStatus::Data,
            Extent::Zero => BlockStatus::Zero,
            Extent::Below => BlockStatus::Unallocated,
        }
    }
}

/// The image file of a read-only format, read through a private [`BlockBackend`] (which pads
/// for O_DIRECT alignment); reads outside the file are [`BlockError::Corrupt`].
pub(crate) struct HostFile {
    child: Arc<dyn BlockDriver>,
    blk: BlockBackend,
    len: u64,
    /// The format's name, for messages.
    format: &'static str,
}

impl HostFile {
    /// Wraps `child`, which must be read-only.
    pub(crate) fn new(child: Arc<dyn BlockDriver>, format: &'static str) -> Result<HostFile> {
        let blk = BlockBackend::new(
            child.clone(),
            BackendOptions {
                read_only: true,
                write_beyond_eof: false,
                ..BackendOptions::default()
            },
        )?;
        Ok(HostFile {
            len: blk.size(),
            child,
            blk,
            format,
        })
    }

    /// The file's length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Reads `buf.len()` bytes at `host`; fails (logged) unless they are all inside the file.
    pub(crate) fn co_read(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        match host.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.blk.co_pread(host, buf),
            _ => Err(self.corrupt(format!(
                "{} bytes at {host:#x} lie beyond the end of the file ({} bytes)",
                buf.len(),
                self.len
            ))),
        }
    }

    /// A corruption error, logged.
    #[cold]
    pub(crate) fn corrupt(&self, why: String) -> BlockError {
        log::error!("{}: image is corrupt: {why}", self.format);
        BlockError::Corrupt(format!("{}: {why}", self.format))
    }

    /// Closes the file node.
    pub(crate) fn close(&self) -> Result<()> {
        self.child.close()
    }
}

/// Reads `buf` at guest `offset`: `map(pos, len)` says what the run starting at `pos` (at most
/// `len` bytes) reads from and how long it is; `below(pos, buf)` reads a run of
/// [`Extent::Below`].
pub(crate) fn co_read_extents(
    file: &HostFile,
    offset: u64,
    buf: &mut [u8],
    mut map: impl FnMut(u64, u64) -> Result<(Extent, u64)>,
    mut below: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let left = (buf.len() - done) as u64;
        let (extent, n) = map(pos, left)?;
        let n = n.clamp(1, left) as usize;
        let part = &mut buf[done..done + n];
        match extent {
            Extent::Data(host) => file.co_read(host, part)?,
            Extent::Zero => part.fill(0),
            Extent::Below => below(pos, part)?,
        }
        done += n;
    }
    Ok(())
}

/// The run starting at guest `pos` (which reads from `first`), at most `len` bytes, of a
/// format with blocks of `block_size` bytes whose extents `extent_at` gives (for any offset
/// in a block; `None` ends the run): blocks of the same kind, data blocks only while they
/// follow each other in the file too.
pub(crate) fn map_run(
    pos: u64,
    len: u64,
    block_size: u64,
    first: Extent,
    extent_at: impl Fn(u64) -> Option<Extent>,
) -> (Extent, u64) {
    let mut n = (block_size - pos % block_size).min(len);
    while n < len {
        let same = match (first, extent_at(pos + n)) {
            (Extent::Data(a), Some(Extent::Data(b))) => b == a + n,
            (a, Some(b)) => a == b,
            (_, None) => false,
        };
        if !same {
            break;
        }
        n = (n + block_size).min(len);
    }
    (first, n)
}

/// Checks that `[offset, offset+len)` lies inside a node of `size` bytes.
pub(crate) fn check_request(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
