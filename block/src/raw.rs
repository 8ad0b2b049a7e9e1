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
//!
//! ## Probed raw images: the first sector is guarded
//!
//! When nobody said the image is raw and the probe merely found no other format
//! ([`RawDriver::mark_probed`]), a guest could write a qcow2 header into its first sector —
//! with a backing file name such as `/etc/shadow` — and the next probing open would show it
//! that host file. QEMU's `raw_co_pwritev()` therefore refuses (`-EPERM`) a write to the first
//! 512 bytes of a probed raw image whose new contents would probe as another format. We do the
//! same, with two differences that fall out of our layering: QEMU raises a probed image's
//! request alignment to 512 so that such a write always covers the whole sector; we keep
//! alignment 1 (no read-modify-write for every unaligned write of the image) and instead build
//! the new sector from the current one and the request, under a `CoMutex` that serialises
//! every change of the first sector — so two partial writes cannot each look harmless and
//! together form a magic. And write-zeroes and discard ranges that touch the sector are
//! checked too (zeroing bytes can complete a magic such as `QED\0`); QEMU checks writes only.
//! With an explicit `-f raw` nothing is restricted.

use std::sync::Arc;

use runtime::CoMutex;

use crate::backend::{BackendOptions, BlockBackend};
use crate::{probe, BlockDriver, BlockError, BlockStatus, Result, Window};

/// The bytes a probe looks at, and so the bytes guarded on a probed image. QEMU:
/// `BLOCK_PROBE_BUF_SIZE`.
pub const PROBE_SECTOR: u64 = 512;

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
    /// The format was probed: guard the child's first sector. QEMU: `bs->probed`.
    probed: bool,
    /// Serialises changes of the child's first sector on a probed image (check, then write).
    first_sector: CoMutex<()>,
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
        if !opts.offset.is_multiple_of(align) {
            return Err(BlockError::Invalid(format!(
                "offset ({}) must be a multiple of the request alignment ({align})",
                opts.offset
            )));
        }
        Ok(RawDriver {
            child,
            offset: opts.offset,
            size: opts.size,
            probed: false,
            first_sector: CoMutex::new(()),
        })
    }

    /// Marks the image as raw *by probing*: writes that would make its first sector probe as
    /// another format are refused with [`BlockError::Refused`] (EPERM). QEMU: `bs->probed`.
    pub fn mark_probed(mut self) -> RawDriver {
        self.probed = true;
        self
    }

    /// Runs `change` — a write of child range `[offset, offset+len)` whose bytes in the first
    /// sector are given by `patch` — after checking, on a probed image, that the first sector
    /// it leaves behind does not look like another format. QEMU: the `bs->probed` branch of
    /// `raw_co_pwritev()`.
    fn co_guard_first_sector(
        &self,
        offset: u64,
        len: u64,
        patch: impl FnOnce(&mut [u8], u64),
        change: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.probed || offset >= PROBE_SECTOR || len == 0 {
            return change();
        }
        let _sector = self.first_sector.co_lock();
        let mut sector = vec![0u8; PROBE_SECTOR as usize];
        let covered = offset == 0 && len >= PROBE_SECTOR;
        if !covered {
            // The current contents, through a backend that pads for the child's alignment.
            let reader = BlockBackend::new(
                self.child.clone(),
                BackendOptions {
                    read_only: true,
                    write_beyond_eof: false,
                    ..BackendOptions::default()
                },
            )?;
            let n = reader.size().min(PROBE_SECTOR) as usize;
            reader.co_pread(0, &mut sector[..n])?;
        }
        patch(&mut sector, offset);
        if let Some(format) = probe::match_magic(&sector) {
            return Err(BlockError::Refused(format!(
                "writing to the first sector of a probed raw image is not allowed (the new \
                 contents look like a {format} image); specify the raw format explicitly \
                 (-f raw) to remove the restriction"
            )));
        }
        change()
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
        let at = self.child_offset(offset)?;
        self.co_guard_first_sector(
            at,
            buf.len() as u64,
            |sector, at| {
                let n = (PROBE_SECTOR - at).min(buf.len() as u64) as usize;
                sector[at as usize..at as usize + n].copy_from_slice(&buf[..n]);
            },
            || self.child.co_pwritev(at, buf),
        )
    }

    fn co_flush(&self) -> Result<()> {
        self.child.co_flush()
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let at = self.child_offset(offset)?;
        self.co_guard_first_sector(at, len, zero_patch(len), || {
            self.child.co_pwrite_zeroes(at, len, may_unmap)
        })
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded bytes may read back as zeros: checked like write-zeroes.
        let at = self.child_offset(offset)?;
        self.co_guard_first_sector(at, len, zero_patch(len), || self.child.co_pdiscard(at, len))
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

    /// The child, shifted by the window's offset: raw adds nothing else to a request but its
    /// size (which the backend above checks) and its truncation rules. A check raw makes on
    /// some changes must be declared here in `guard` (the probed-image first-sector guard, in
    /// the child's coordinates), or whoever looks through the window — the async engine —
    /// would skip it.
    fn window(&self) -> Option<Window<'_>> {
        Some(Window {
            child: &*self.child,
            offset: self.offset,
            guard: if self.probed { PROBE_SECTOR } else { 0 },
        })
    }
}

/// The first-sector patch of a write-zeroes of `len` bytes.
fn zero_patch(len: u64) -> impl FnOnce(&mut [u8], u64) {
    move |sector, at| {
        let end = at.saturating_add(len).min(PROBE_SECTOR) as usize;
        sector[at as usize..end].fill(0);
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
