//! Backing files of a qcow2 image: finding, opening and reading the chain below an image.
//!
//! QEMU: `block.c` (`bdrv_open_backing_file()`, `bdrv_get_full_backing_filename()`,
//! `path_combine()`, `bdrv_default_perms_for_cow()`), `block/qcow2.c` (the backing file name
//! and the backing format extension in `qcow2_do_open()`), and the unallocated branch of
//! `qcow2_co_preadv_task()`.
//!
//! A cluster that is not allocated in a qcow2 image reads from the image's *backing file*, which
//! may itself be a qcow2 image with a backing file, and so on: a chain, top to base. The header
//! names the backing file; this module turns the name into an open, read-only node:
//!
//! 1. **Path.** An absolute name is used as it is. A relative one is relative to the directory
//!    of the image that names it — not to the process's working directory — so a chain that
//!    was created as `qemu-img create -b base.qcow2 top.qcow2` opens from anywhere. Names with
//!    a protocol prefix (`nbd:…`, `json:{…}`) are refused: only local files are supported.
//! 2. **Loops and depth.** Every image of the chain is identified by (device, inode); a backing
//!    file that is already in the chain is a loop. At most [`MAX_CHAIN_DEPTH`] backing files
//!    below the top image are opened.
//! 3. **Permissions.** The file is opened read-only through the `file` driver with QEMU's
//!    permissions for a copy-on-write child: we use *consistent read* and share *consistent
//!    read* and *write unchanged* (the read-only row of [`crate::image_lock`]). A VM writing to
//!    the base image is seen and refused; other readers are not. `-U`/force-share and the cache
//!    mode are inherited from the top image, as QEMU's backing child inherits them.
//! 4. **Format.** The backing format extension (`qemu-img create -F qcow2|raw|vmdk|…`)
//!    decides. Without it the file is probed: qcow2 and the read-only formats of
//!    [`crate::readonly`] (vdi, vpc, vhdx, vmdk — a vmdk's extent files beside it) are opened as
//!    such, another known format is refused by name,
//!    and *raw is refused*: a probed raw backing file is exactly what a guest could forge (it
//!    writes a qcow2 header into its disk, pointing at a host file as *its* backing file), so we
//!    require the format to be stated — QEMU's safe rule (`qemu-img rebase -u -F raw`).
//!
//! Reading below: [`Qcow2Driver::co_read_below`] is the one path for guest ranges that the
//! image itself does not hold. It reads the backing node through a private read-only
//! [`BlockBackend`] (which pads for O_DIRECT alignment), and returns zeros past the backing
//! file's end (a base smaller than the image) or when there is no backing file.
//!
//! Block status through the chain is [`crate::chain`]'s job: a qcow2 node reports
//! [`crate::BlockStatus::Unallocated`] for such clusters and offers its backing node through
//! [`crate::BlockDriver::backing_node`].

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Qcow2Driver;
use crate::backend::{BackendOptions, BlockBackend};
use crate::{
    probe, BlockDriver, BlockError, CacheMode, FileDriver, FileOptions, RawDriver, RawOptions,
    Result,
};

/// At most this many backing files below the top image.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// How the backing chain of an image is opened: inherited from the top image. Backing files are
/// always read-only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainOptions {
    /// The cache mode of the top image (`none` opens every backing file with `O_DIRECT`).
    pub cache: CacheMode,
    /// How the files' blocking I/O is done (QEMU `aio=`).
    pub aio: crate::AioMode,
    /// Take no image locks (QEMU `-U`).
    pub force_share: bool,
    /// Cache sizes, for the top image and each qcow2 image below it.
    pub qcow2: super::Qcow2Options,
}

/// An open backing file of a qcow2 image (or the parent of a vhdx differencing image).
pub(crate) struct Backing {
    /// The backing node: `raw`, `qcow2` or a read-only format ([`crate::readonly`]) over
    /// `file`.
    node: Arc<dyn BlockDriver>,
    /// Read-only view of `node` that pads for its alignment.
    blk: BlockBackend,
    /// Its length (read-only, so fixed).
    len: u64,
    /// The resolved path, for messages.
    path: PathBuf,
}

/// Identity of an image file in the chain: (device, inode).
type FileId = crate::readonly::FileId;

impl Backing {
    /// Reads `[offset, +buf.len())` of the backing node; zeros past its end (a backing file
    /// shorter than the image above it).
    pub(crate) fn co_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        self.blk.co_pread(offset, inside)
    }

    /// The backing node.
    pub(crate) fn node(&self) -> &dyn BlockDriver {
        &*self.node
    }

    /// The path it was opened from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Closes it (nothing to flush: it is read-only).
    pub(crate) fn close(&self) {
        if let Err(e) = self.node.close() {
            log::warn!("closing backing file '{}': {e}", self.path.display());
        }
    }
}

impl Qcow2Driver {
    /// Opens a qcow2 image and its backing chain. `image` is the path the image was opened from
    /// (relative backing file names resolve against its directory). Errors about the chain are
    /// [`BlockError::Backing`] and name each image on the way down.
    pub fn open_chain(
        child: Arc<dyn BlockDriver>,
        image: &Path,
        opts: &ChainOptions,
    ) -> Result<Qcow2Driver> {
        let mut seen = Vec::new();
        if let Ok(meta) = std::fs::metadata(image) {
            seen.push((meta.dev(), meta.ino()));
        }
        Qcow2Driver::open_chain_at(child, image, opts, &mut seen)
    }

    /// [`Qcow2Driver::open_chain`] for an image `seen.len() - 1` levels below the top.
    fn open_chain_at(
        child: Arc<dyn BlockDriver>,
        image: &Path,
        opts: &ChainOptions,
        seen: &mut Vec<FileId>,
    ) -> Result<Qcow2Driver> {
        let mut driver = Qcow2Driver::open_node(child, &opts.qcow2)?;
        if let Some(name) = driver.header.backing_file.clone() {
            let format = driver.header.backing_format.clone();
            let backing =
                open_backing(image, &name, format.as_deref(), opts, seen).map_err(|source| {
                    BlockError::Backing {
                        image: image.to_owned(),
                        source: Box::new(source),
                    }
                })?;
            driver.backing = Some(backing);
        }
        Ok(driver)
    }

    /// Reads guest range `[guest_offset, +buf.len())`, which this image does not hold, from
    /// below: the backing file, zeros past its end, or zeros without one. This is the one read
    /// path for unallocated clusters (and the copy-on-write source of the writable driver).
    /// QEMU: `QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN` in `qcow2_co_preadv_task()`.
    pub(super) fn co_read_below(&self, guest_offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.co_read(guest_offset, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The length of the backing file (0 without one): unallocated clusters past it read as
    /// zeros.
    pub(super) fn backing_len(&self) -> u64 {
        self.backing.as_ref().map_or(0, |b| b.len)
    }

    /// Whether the image has a backing file (then unallocated clusters are not zeros).
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// The path the backing file was opened from, if there is one.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    /// The backing node, for block status through the chain.
    pub(super) fn backing_driver(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_ref().map(|b| &*b.node)
    }

    /// Closes the backing chain (nothing to flush: it is read-only).
    pub(super) fn close_backing(&self) {
        if let Some(b) = &self.backing {
            b.close();
        }
    }
}

/// The error of [`Qcow2Driver::open`] for an image that has a backing file: it cannot be found
/// without the image's path.
#[cold]
pub(super) fn needs_chain(name: &Path) -> BlockError {
    BlockError::Invalid(format!(
        "qcow2: the image has a backing file ('{}'); open it with its path \
         (open_image or Qcow2Driver::open_chain)",
        name.display()
    ))
}

/// QEMU's `path_has_protocol()`: a colon before any slash (`nbd:host:port`, `json:{…}`).
pub(crate) fn has_protocol(name: &Path) -> bool {
    let bytes = name.as_os_str().as_bytes();
    let end = bytes.iter().position(|&c| c == b'/').unwrap_or(bytes.len());
    bytes[..end].contains(&b':')
}

/// The backing file `name` of `image` as a path: absolute, or relative to the image's
/// directory. QEMU: `bdrv_get_full_backing_filename()` → `path_combine()`.
pub fn resolve_backing_path(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_owned(),
    }
}

/// Opens backing file `name` of `image` (format from the header extension, or probed; a
/// vhdx differencing image passes its parent's format). `seen` lists the files already in the
/// chain.
pub(crate) fn open_backing(
    image: &Path,
    name: &Path,
    format: Option<&str>,
    opts: &ChainOptions,
    seen: &mut Vec<FileId>,
) -> Result<Backing> {
    let invalid = BlockError::Invalid;
    if has_protocol(name) {
        return Err(invalid(format!(
            "'{}' names a protocol; only local backing files are supported",
            name.display()
        )));
    }
    let path = resolve_backing_path(image, name);
    if seen.len() > MAX_CHAIN_DEPTH {
        return Err(invalid(format!(
            "'{}': the backing chain is too deep (more than {MAX_CHAIN_DEPTH} backing files)",
            path.display()
        )));
    }
    // Identify the file before opening it; a missing file or a directory is reported by the
    // file driver below, with its errno.
    if let Ok(meta) = std::fs::metadata(&path) {
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(invalid(format!(
                "'{}' is already in the backing chain: the chain is a loop",
                path.display()
            )));
        }
        seen.push(id);
    }
    let file_opts = FileOptions {
        read_only: true,
        cache: opts.cache,
        aio: opts.aio,
        force_share: opts.force_share,
    };
    let file: Arc<dyn BlockDriver> = Arc::new(FileDriver::open(&path, &file_opts)?);
    let format = match format {
        Some(f) => f.to_owned(),
        None => match probe::probe(&file)? {
            Some(f) => f.to_owned(),
            None => {
                return Err(invalid(format!(
                    "'{}': backing file format not given; probing it as raw is refused: \
                     rebase with -F raw (qemu-img rebase -u -b '{}' -F raw '{}')",
                    path.display(),
                    name.display(),
                    image.display()
                )))
            }
        },
    };
    let node: Arc<dyn BlockDriver> = match format.as_str() {
        "raw" => Arc::new(RawDriver::new(file, RawOptions::default())?),
        "qcow2" => Arc::new(
            Qcow2Driver::open_chain_at(file, &path, opts, seen)
                .map_err(|e| name_error(&path, e))?,
        ),
        other => match crate::readonly::open_node(other, file, &path, opts, seen) {
            Some(node) => node?,
            None => {
                return Err(invalid(format!(
                    "'{}': backing file format '{other}' is not supported (raw, qcow2, {} are)",
                    path.display(),
                    crate::readonly::FORMATS.join(", ")
                )))
            }
        },
    };
    let blk = BlockBackend::new(
        node.clone(),
        BackendOptions {
            read_only: true,
            write_beyond_eof: false,
            ..BackendOptions::default()
        },
    )?;
    log::debug!(
        "'{}': backing file '{}' ({format}, {} bytes)",
        image.display(),
        path.display(),
        blk.size()
    );
    Ok(Backing {
        len: blk.size(),
        node,
        blk,
        path,
    })
}

/// Prefixes the file name to the errors of the qcow2 driver, which do not name the file.
pub(crate) fn name_error(path: &Path, e: BlockError) -> BlockError {
    let name = |why: String| format!("'{}': {why}", path.display());
    match e {
        BlockError::Invalid(why) => BlockError::Invalid(name(why)),
        BlockError::Corrupt(why) => BlockError::Corrupt(name(why)),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_paths_resolve_against_the_image_directory() {
        let p = |s: &str| Path::new(s).to_owned();
        assert_eq!(
            resolve_backing_path(Path::new("/a/b/top.qcow2"), Path::new("base.qcow2")),
            p("/a/b/base.qcow2")
        );
        assert_eq!(
            resolve_backing_path(Path::new("d/top.qcow2"), Path::new("../base")),
            p("d/../base")
        );
        assert_eq!(
            resolve_backing_path(Path::new("top.qcow2"), Path::new("base")),
            p("base")
        );
        assert_eq!(
            resolve_backing_path(Path::new("d/top.qcow2"), Path::new("/abs/base")),
            p("/abs/base")
        );
    }

    #[test]
    fn protocols_are_recognised() {
        assert!(has_protocol(Path::new("nbd:localhost:10809")));
        assert!(has_protocol(Path::new("json:{\"driver\":\"raw\"}")));
        assert!(!has_protocol(Path::new("dir/with:colon")));
        assert!(!has_protocol(Path::new("base.qcow2")));
    }
}
