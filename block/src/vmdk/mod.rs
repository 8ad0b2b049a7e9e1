//! The `vmdk` format driver, read-only: VMware virtual disks as `qemu-img` and VMware make
//! them — monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat and
//! streamOptimized.
//!
//! QEMU: `block/vmdk.c` (`vmdk_open()`, `vmdk_co_preadv()`, `vmdk_co_block_status()`); the
//! format is VMware's "Virtual Disk Format 1.1" specification.
//!
//! # Where things live
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` (here) | the driver: open (sparse file or descriptor), the extent list, reads, block status |
//! | [`header`] | the `KDMV` sparse header, the stream-optimized footer, their checks |
//! | [`descriptor`] | the text descriptor: createType, extent lines, parent |
//! | `sparse` | one sparse extent: grain directory, grain table cache, grains (plain or compressed) |
//!
//! # A disk is a list of extents
//!
//! A VMDK disk is a sequence of *extents*, each a range of the virtual disk kept in one file:
//!
//! - **monolithicSparse / streamOptimized**: one file starting with a `KDMV` header; the whole
//!   disk is one sparse extent (the descriptor embedded after the header is only checked for a
//!   parent). streamOptimized is the same with deflate-compressed grains.
//! - **monolithicFlat / twoGbMaxExtentFlat**: a text descriptor naming one or more *flat*
//!   files, whose bytes are the disk's bytes.
//! - **twoGbMaxExtentSparse**: a text descriptor naming several sparse files (each with its
//!   own `KDMV` header), at most 2 GiB of disk each.
//!
//! Extent files are found relative to the directory of the descriptor; absolute names are used
//! as they are (QEMU allows them too). Names with a protocol prefix (`nbd:…`) are refused. Each
//! file is opened read-only through the `file` driver with the image's cache mode and locking
//! (the read-only row: other readers may share it, a writer is refused).
//!
//! **Trust:** the descriptor chooses which host files are read — an absolute name or `../`
//! reaches any file the exporting user may read, and exports its bytes. The same holds for
//! qcow2 backing names and vhdx parent locators, as in QEMU. Export an untrusted image as a
//! user who may read only what it should, or look at its descriptor first (`head -c 2048`).
//!
//! # Read-only
//!
//! Writing VMDK is not implemented: the driver is read-only, one of the read-only formats of
//! [`crate::readonly`]. `open_image` refuses a writable open
//! ([`crate::readonly::require_read_only`]) with a message pointing at `-r` and at
//! `--snapshot`/`--overlay`, which put a qcow2 overlay (backing format `vmdk`) on top of the
//! untouched VMDK files (see `crate::overlay`): a user who asked for a writable export learns
//! at once, not at the first failed write of a `mkfs`. Unlike `readonly::HostFile`, an extent
//! file reads zeros past its end, as QEMU's file driver pads short reads (a flat file shorter
//! than its extent, a last grain cut short); only a table or grain that *starts* past the end
//! is corruption.
//!
//! # Block status
//!
//! Sparse extents: an allocated grain (plain or compressed) is data; an unallocated grain, or
//! a zeroed one (the zeroed-grain flag, GT entry 1), is zero. Flat extents: the status of the
//! flat file's bytes (holes of a sparse flat file are zero). `ZERO` extents: zero.
//!
//! # Not supported
//!
//! Writes, delta disks with a parent (`parentFileNameHint`, made by `qemu-img create -f vmdk
//! -b`), VMware 3 `COWD`/vmfsSparse and ESXi seSparse extents, `NOACCESS` extents.

pub mod descriptor;
pub mod header;
mod sparse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::{BackendOptions, BlockBackend};
use crate::{BlockDriver, BlockError, BlockStatus, FileDriver, FileOptions, Result};
use descriptor::ExtentKind;
use header::SECTOR;
pub use sparse::inflate_zlib;
use sparse::SparseExtent;

/// One file of the disk, read through a private read-only [`BlockBackend`] (which pads for
/// O_DIRECT alignment); bytes past its end read as zeros.
pub(crate) struct ExtentFile {
    node: Arc<dyn BlockDriver>,
    blk: BlockBackend,
    len: u64,
    /// The name, for messages.
    name: String,
    /// Corruption was logged already (once per file is enough).
    reported: AtomicBool,
}

impl ExtentFile {
    fn new(node: Arc<dyn BlockDriver>, name: String) -> Result<ExtentFile> {
        let blk = BlockBackend::new(
            node.clone(),
            BackendOptions {
                read_only: true,
                write_beyond_eof: false,
                ..BackendOptions::default()
            },
        )?;
        Ok(ExtentFile {
            len: blk.size(),
            node,
            blk,
            name,
            reported: AtomicBool::new(false),
        })
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Reads `buf.len()` bytes at `pos`; what lies past the end of the file reads as zeros.
    fn co_read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.len.saturating_sub(pos).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        self.blk.co_pread(pos, inside)
    }

    /// The error for corrupt metadata in this file; logged the first time.
    #[cold]
    fn corrupt(&self, why: String) -> BlockError {
        if !self.reported.swap(true, Ordering::Relaxed) {
            log::error!(
                "vmdk: '{}' is corrupt: {why}; reads that need it fail with EIO (further \
                 problems in this file are not logged)",
                self.name
            );
        }
        BlockError::Corrupt(format!("vmdk: '{}': {why}", self.name))
    }
}

/// What an extent's bytes come from.
enum ExtentData {
    /// The bytes of a file from `offset` on (`FLAT`, `VMFS`).
    Flat { file: Arc<ExtentFile>, offset: u64 },
    /// A hosted sparse extent.
    Sparse(Arc<SparseExtent>),
    /// Zeros (`ZERO`).
    Zero,
}

/// One extent: `[start, start + len)` of the virtual disk.
struct Extent {
    start: u64,
    len: u64,
    data: ExtentData,
}

impl Extent {
    /// Reads `[pos, pos + buf.len())` of the extent (relative offsets, inside it).
    fn co_read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        match &self.data {
            ExtentData::Flat { file, offset } => file.co_read(offset + pos, buf),
            ExtentData::Sparse(s) => s.co_read(pos, buf),
            ExtentData::Zero => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The status at relative `pos`, for at most `len` bytes (inside the extent).
    fn co_block_status(&self, pos: u64, len: u64) -> Result<(BlockStatus, u64)> {
        match &self.data {
            ExtentData::Flat { file, offset } => {
                let at = offset + pos;
                if at >= file.len() {
                    return Ok((BlockStatus::Zero, len));
                }
                file.blk.co_block_status(at, len.min(file.len() - at))
            }
            ExtentData::Sparse(s) => s.co_block_status(pos, len),
            ExtentData::Zero => Ok((BlockStatus::Zero, len)),
        }
    }
}

/// Opens the extent file named `name` in a descriptor: the path, then the node.
pub type ExtentOpener<'a> = dyn FnMut(&Path) -> Result<Arc<dyn BlockDriver>> + 'a;

/// The `vmdk` format, read-only. QEMU: `BDRVVmdkState`.
pub struct VmdkDriver {
    /// Sorted by `start`, back to back from 0.
    extents: Vec<Extent>,
    size: u64,
    /// "monolithicSparse", "streamOptimized", or the descriptor's `createType`.
    create_type: String,
    /// Every file opened (the descriptor or sparse file first), for `close`.
    files: Vec<Arc<ExtentFile>>,
}

/// The files a descriptor names, each opened once however often it is named (so a crafted
/// descriptor repeating one big sparse file does not load its grain directory again and
/// again).
#[derive(Default)]
struct Opened {
    files: HashMap<PathBuf, Arc<ExtentFile>>,
    sparse: HashMap<PathBuf, Arc<SparseExtent>>,
}

impl VmdkDriver {
    /// Opens the image whose first file (a sparse extent or a text descriptor) is `file`,
    /// opened from `path`; extent files named by a descriptor are opened read-only with the
    /// `file` driver and `opts`. Runs its I/O on the calling thread outside a coroutine.
    /// Errors say what is wrong but do not name `path` (the caller does).
    pub fn open(file: Arc<dyn BlockDriver>, path: &Path, opts: &FileOptions) -> Result<Self> {
        let opts = FileOptions {
            read_only: true,
            ..*opts
        };
        VmdkDriver::open_with(
            file,
            path,
            &mut |p: &Path| -> Result<Arc<dyn BlockDriver>> {
                Ok(Arc::new(FileDriver::open(p, &opts)?))
            },
        )
    }

    /// [`VmdkDriver::open`] with the extent files opened by `open_extent` (given the resolved
    /// path): the fuzz target serves them from memory.
    pub fn open_with(
        file: Arc<dyn BlockDriver>,
        path: &Path,
        open_extent: &mut ExtentOpener<'_>,
    ) -> Result<Self> {
        let first = Arc::new(ExtentFile::new(file, path.display().to_string())?);
        if first.len() < 4 {
            return Err(BlockError::Corrupt(
                "vmdk: the file is too small to be a vmdk image".into(),
            ));
        }
        let mut magic = [0u8; 4];
        first.co_read(0, &mut magic)?;
        if &magic == header::MAGIC || &magic == header::COWD_MAGIC {
            return VmdkDriver::open_monolithic(first);
        }
        let mut text = vec![0u8; first.len().min(descriptor::MAX_DESCRIPTOR) as usize];
        first.co_read(0, &mut text)?;
        check_no_parent(&text)?;
        let desc = descriptor::parse(&text)?;
        let mut driver = VmdkDriver {
            extents: Vec::with_capacity(desc.extents.len()),
            size: 0,
            create_type: desc.create_type,
            files: vec![first],
        };
        let mut opened = Opened::default();
        for line in desc.extents {
            driver.add_extent(path, line, &mut opened, open_extent)?;
        }
        driver.files.extend(opened.files.into_values());
        Ok(driver)
    }

    /// A monolithicSparse or streamOptimized file: one sparse extent, the whole disk.
    fn open_monolithic(file: Arc<ExtentFile>) -> Result<Self> {
        let sparse = SparseExtent::open(file.clone())?;
        // The embedded descriptor, if any, only matters for a parent.
        let mut sector = vec![0u8; SECTOR as usize];
        file.co_read(0, &mut sector)?;
        let h = header::SparseHeader::parse(&sector)?;
        let at = h.desc_offset.saturating_mul(SECTOR);
        let len = h
            .desc_size
            .saturating_mul(SECTOR)
            .min(descriptor::MAX_DESCRIPTOR)
            .min(file.len().saturating_sub(at));
        if h.desc_offset != 0 && len > 0 {
            let mut text = vec![0u8; len as usize];
            file.co_read(at, &mut text)?;
            check_no_parent(&text)?;
        }
        let create_type = if sparse.is_compressed() {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let size = sparse.capacity();
        Ok(VmdkDriver {
            extents: vec![Extent {
                start: 0,
                len: size,
                data: ExtentData::Sparse(Arc::new(sparse)),
            }],
            size,
            create_type: create_type.into(),
            files: vec![file],
        })
    }

    /// Opens the extent of one descriptor line and appends it to the disk.
    fn add_extent(
        &mut self,
        descriptor: &Path,
        line: descriptor::ExtentLine,
        opened: &mut Opened,
        open_extent: &mut ExtentOpener<'_>,
    ) -> Result<()> {
        let (len, data) = match line.kind {
            ExtentKind::Zero => (line.len, ExtentData::Zero),
            ExtentKind::Flat { file, offset } => {
                let path = extent_path(descriptor, Path::new(&file))?;
                let file = opened.file(&path, open_extent)?;
                (line.len, ExtentData::Flat { file, offset })
            }
            ExtentKind::Sparse { file } => {
                let path = extent_path(descriptor, Path::new(&file))?;
                let sparse = opened.sparse(&path, open_extent)?;
                // As QEMU: the extent's header decides its size.
                if sparse.capacity() != line.len {
                    log::warn!(
                        "vmdk: extent '{}' has {} bytes, the descriptor says {}: using the \
                         extent's",
                        path.display(),
                        sparse.capacity(),
                        line.len
                    );
                }
                (sparse.capacity(), ExtentData::Sparse(sparse))
            }
        };
        let start = self.size;
        self.size = start
            .checked_add(len)
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| BlockError::Corrupt("vmdk: the extents add up to too much".into()))?;
        if len > 0 {
            self.extents.push(Extent { start, len, data });
        }
        Ok(())
    }

    /// The subformat: "monolithicSparse", "streamOptimized", or the descriptor's createType.
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    /// How many extents the disk has.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// The extent holding disk offset `pos` (< size).
    fn extent_at(&self, pos: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        self.extents
            .get(i)
            .ok_or_else(|| BlockError::Invalid(format!("vmdk: offset {pos} is past the disk")))
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

impl Opened {
    /// The file at `path`, opened now or before.
    fn file(&mut self, path: &Path, open: &mut ExtentOpener<'_>) -> Result<Arc<ExtentFile>> {
        if let Some(f) = self.files.get(path) {
            return Ok(f.clone());
        }
        let node = open(path).map_err(|e| extent_error(path, e))?;
        let file = Arc::new(ExtentFile::new(node, path.display().to_string())?);
        self.files.insert(path.to_owned(), file.clone());
        Ok(file)
    }

    /// The sparse extent in the file at `path`, opened now or before.
    fn sparse(&mut self, path: &Path, open: &mut ExtentOpener<'_>) -> Result<Arc<SparseExtent>> {
        if let Some(s) = self.sparse.get(path) {
            return Ok(s.clone());
        }
        let file = self.file(path, open)?;
        let sparse = Arc::new(SparseExtent::open(file).map_err(|e| extent_error(path, e))?);
        self.sparse.insert(path.to_owned(), sparse.clone());
        Ok(sparse)
    }
}

/// Refuses a delta disk: its unallocated grains would read from a parent we do not open.
fn check_no_parent(text: &[u8]) -> Result<()> {
    match descriptor::parent_hint(text) {
        None => Ok(()),
        Some(parent) => Err(BlockError::Invalid(format!(
            "vmdk: delta disks with a parent ('{parent}') are not supported; convert it first \
             (qemu-img convert -O vmdk)"
        ))),
    }
}

/// The path of extent file `name` of the descriptor at `descriptor`: relative to its directory,
/// or absolute. QEMU: `vmdk_parse_extents()`.
fn extent_path(descriptor: &Path, name: &Path) -> Result<PathBuf> {
    if crate::qcow2::has_protocol(name) {
        return Err(BlockError::Invalid(format!(
            "vmdk: extent '{}' names a protocol; only local files are supported",
            name.display()
        )));
    }
    Ok(crate::qcow2::resolve_backing_path(descriptor, name))
}

/// Names the extent file in an error that does not.
fn extent_error(path: &Path, e: BlockError) -> BlockError {
    let name = |why: String| format!("extent '{}': {why}", path.display());
    match e {
        BlockError::Invalid(why) => BlockError::Invalid(name(why)),
        BlockError::Corrupt(why) if !why.contains(&path.display().to_string()) => {
            BlockError::Corrupt(name(why))
        }
        e => e,
    }
}

impl BlockDriver for VmdkDriver {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn getlength(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    /// Splits the request at extent boundaries. QEMU: `vmdk_co_preadv()`.
    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos)?;
            let rel = pos - e.start;
            let n = (e.len - rel).min((buf.len() - done) as u64) as usize;
            e.co_read(rel, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn co_pwritev(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn co_flush(&self) -> Result<()> {
        Ok(())
    }

    fn co_pwrite_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn co_pdiscard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    /// The status inside one extent; callers loop. QEMU: `vmdk_co_block_status()`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_request(offset, len)?;
        let e = self.extent_at(offset)?;
        let rel = offset - e.start;
        let (status, n) = e.co_block_status(rel, len.min(e.len - rel))?;
        Ok((status, n.clamp(1, len)))
    }

    fn co_truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    /// Sizes are whole sectors.
    fn size_granularity(&self) -> u64 {
        SECTOR
    }

    fn close(&self) -> Result<()> {
        let mut result = Ok(());
        for f in &self.files {
            if let Err(e) = f.node.close() {
                log::warn!("vmdk: closing '{}': {e}", f.name());
                result = Err(e);
            }
        }
        result
    }
}
