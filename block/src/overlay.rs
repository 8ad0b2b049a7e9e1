//! Write overlays: exporting an image without writing to it, every write going to a qcow2
//! image whose backing file is the image (`--snapshot`, `--overlay FILE`).
//!
//! QEMU: `bdrv_append_temp_snapshot()` in `block.c` (`-snapshot`, `qemu-nbd --snapshot`: a
//! temporary qcow2 overlay in `$TMPDIR`, default `/var/tmp`, deleted when closed) and the
//! `qemu-img create -f qcow2 -b IMAGE -F FMT OVERLAY` + `qemu-img commit OVERLAY` workflow.
//!
//! Both kinds are the same chain: a writable qcow2 top ([`crate::Qcow2Driver`]) over the image,
//! which is opened read-only as a backing file by [`crate::qcow2::backing`] — with the read-only
//! lock row (others may read it; a writer is refused), or with no lock at all under `-U`
//! (`force_share`), which here applies to the image only: the overlay is always locked.
//!
//! 1. **The image is looked at first**, opened read-only with the caller's options: its format
//!    (as given, or probed; raw, qcow2 or the read-only vmdk) is recorded in the overlay's backing format extension, so the image
//!    is never probed again, and its virtual size becomes the overlay's.
//! 2. **`--snapshot`** makes a new overlay in `$TMPDIR` (or `/var/tmp`), opens the chain, then
//!    unlinks the overlay at once: the open file lives as long as the export, and nothing is
//!    left behind after any exit — SIGKILL included. (QEMU unlinks at close instead; a crash
//!    then leaves the file in `/var/tmp`.)
//! 3. **`--overlay FILE`** makes FILE if it does not exist, naming the image by its absolute
//!    path (so the overlay opens from any directory; `qemu-img rebase -u -b` changes it). An
//!    existing FILE must be a qcow2 image whose backing file resolves to the image (same device
//!    and inode), else it is refused before anything is opened for writing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::qcow2::{self, Header};
use crate::{BlockBackend, BlockError, Format, OpenOptions, Result, Rule};

/// Where the writes of an export go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Overlay {
    /// A temporary qcow2 overlay in `$TMPDIR` (default `/var/tmp`), gone at exit.
    Temporary,
    /// This qcow2 overlay, created if missing; kept.
    File(PathBuf),
}

/// What [`open_with_overlay`] opened.
#[derive(Debug)]
pub struct Opened {
    /// The writable export: the overlay over the image.
    pub blk: Arc<BlockBackend>,
    /// The overlay's path (for a temporary one, where it was: it is already unlinked).
    pub overlay: PathBuf,
    /// Whether the overlay was created now.
    pub created: bool,
    /// The image's format as recorded in the overlay ("raw", "qcow2").
    pub image_format: &'static str,
}

/// The directory of temporary overlays: `$TMPDIR`, else `/var/tmp` (QEMU's
/// `get_tmp_filename()`: `/var/tmp` because `/tmp` is often a small tmpfs).
pub fn temp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/var/tmp"),
    }
}

/// Opens `image` (with `opts`, which must not ask for a raw window) under `overlay`; `inject`
/// rules go between the backend and the overlay's driver, as in [`crate::open_image_with`].
/// `opts.force_share` (or `backing_force_share`) applies to the image only.
pub fn open_with_overlay(
    image: &Path,
    opts: &OpenOptions,
    inject: &[Rule],
    overlay: &Overlay,
) -> Result<Opened> {
    if opts.format == Format::Null {
        return Err(BlockError::Invalid(
            "the null driver has no image to put an overlay on".into(),
        ));
    }
    if opts.offset != 0 || opts.size.is_some() {
        return Err(BlockError::Invalid(
            "the offset and size options cannot be combined with an overlay".into(),
        ));
    }
    let share = opts.force_share || opts.backing_force_share;
    // 1. The image, read-only: its format and size; closed again before the chain opens it.
    let (image_format, size) = {
        let base_opts = OpenOptions {
            read_only: true,
            force_share: share,
            backing_force_share: share,
            ..*opts
        };
        let base = crate::open_image(image, &base_opts)?;
        (base.format_name(), base.size())
    };
    let image_abs = std::path::absolute(image).map_err(|source| BlockError::Open {
        path: image.to_owned(),
        source,
    })?;
    // The overlay keeps sizes in sectors: an odd-sized raw image gets an overlay rounded up
    // (the tail reads as zeros past the image's end), as QEMU's would.
    let size = size.next_multiple_of(512);
    let top_opts = OpenOptions {
        format: Format::Qcow2,
        read_only: false,
        force_share: false,
        backing_force_share: share,
        ..*opts
    };
    match overlay {
        Overlay::Temporary => {
            let path = create_temporary(&temp_dir(), size, &image_abs, image_format)?;
            let opened = crate::open_image_with(&path, &top_opts, inject);
            // Unlinked whatever happened: open, it lives on as long as the export.
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("cannot remove temporary overlay {}: {e}", path.display());
            }
            Ok(Opened {
                blk: opened?,
                overlay: path,
                created: true,
                image_format,
            })
        }
        Overlay::File(path) => {
            let created = match std::fs::symlink_metadata(path) {
                Ok(_) => {
                    check_backing(path, image)?;
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    qcow2::create_qcow2_overlay(path, size, &image_abs, image_format)?;
                    true
                }
                Err(source) => {
                    return Err(BlockError::Open {
                        path: path.clone(),
                        source,
                    })
                }
            };
            let blk = crate::open_image_with(path, &top_opts, inject).inspect_err(|_| {
                if created {
                    let _ = std::fs::remove_file(path);
                }
            })?;
            Ok(Opened {
                blk,
                overlay: path.clone(),
                created,
                image_format,
            })
        }
    }
}

/// Makes a new overlay file in `dir` with a name no one else has.
fn create_temporary(dir: &Path, size: u64, image: &Path, format: &str) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0u32..100 {
        let name = format!(
            "coro-fuse-snapshot-{}-{:08x}.qcow2",
            std::process::id(),
            stamp.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        );
        let path = dir.join(name);
        match qcow2::create_qcow2_overlay(&path, size, image, format) {
            Err(BlockError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(BlockError::Open { source, .. }) => {
                return Err(BlockError::Open {
                    path: dir.to_owned(),
                    source,
                })
            }
            Err(e) => return Err(e),
            Ok(()) => return Ok(path),
        }
    }
    Err(BlockError::Invalid(format!(
        "cannot find a free name for a temporary overlay in {}",
        dir.display()
    )))
}

/// An existing `overlay` must be a qcow2 image whose backing file is `image`.
fn check_backing(overlay: &Path, image: &Path) -> Result<()> {
    let open_err = |source| BlockError::Open {
        path: overlay.to_owned(),
        source,
    };
    let bytes = {
        use std::io::Read;
        let mut head = Vec::with_capacity(1 << 16);
        std::fs::File::open(overlay)
            .map_err(open_err)?
            .take(2 << 20)
            .read_to_end(&mut head)
            .map_err(open_err)?;
        head
    };
    let len = std::fs::metadata(overlay).map_err(open_err)?.len();
    let refuse = |why: String| {
        BlockError::Invalid(format!(
            "overlay '{}' {why}; an overlay of '{}' must be a qcow2 image with it as backing \
             file (remove the file to have a new overlay made)",
            overlay.display(),
            image.display()
        ))
    };
    if crate::probe::match_magic(&bytes) != Some("qcow2") {
        return Err(refuse("is not a qcow2 image".into()));
    }
    let header = Header::parse(&bytes, len).map_err(|e| qcow2::name_error(overlay, e))?;
    let Some(name) = header.backing_file else {
        return Err(refuse("has no backing file".into()));
    };
    let backing = qcow2::resolve_backing_path(overlay, &name);
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let image_id = id(image).ok_or_else(|| refuse("cannot be checked".into()))?;
    if id(&backing) != Some(image_id) {
        return Err(refuse(format!("has backing file '{}'", backing.display())));
    }
    Ok(())
}
