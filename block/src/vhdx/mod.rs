//! The `vhdx` format (Hyper-V), read-only: fixed, dynamic and differencing images.
//!
//! QEMU: `block/vhdx.c` (`vhdx_open()`, `vhdx_block_translate()`, `vhdx_co_readv()`,
//! `vhdx_check_bat_entries()`), `block/vhdx-log.c`; the format is Microsoft's "VHDX Format
//! Specification v1.00". QEMU refuses differencing images; we read them.
//!
//! # Where things live
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` (here) | the driver: open, the block allocation table, the read path, block status |
//! | [`header`] | headers, region table, metadata, CRC-32C, parent locator parsing, the log check |
//! | `parent` | finding, opening and checking a differencing image's parent |
//!
//! # Layout
//!
//! After the header section (file identifier, two checksummed headers, the region table), the
//! *metadata region* gives the block size (1–256 MiB), the virtual size, the logical sector
//! size and, for a differencing image, the *parent locator*; the *BAT region* holds one 64-bit
//! entry per payload block: a state (bits 0–2) and a file offset in MiB (bits 20–63). After
//! every `chunk_ratio` payload entries (2^23 sectors' worth) comes the entry of a *sector bitmap
//! block*, which a differencing image uses: one bit per logical sector, set if the sector is
//! in this file, clear if it reads from the parent.
//!
//! Payload block states, and what we read for them:
//!
//! | state | reads as |
//! |---|---|
//! | 0 not present | zeros; the parent's bytes in a differencing image |
//! | 1 undefined, 2 zero, 3 (and 5, v0.95) unmapped | zeros |
//! | 6 fully present | the block in the file |
//! | 7 partially present (differencing only) | per sector: the file (bit set) or the parent |
//!
//! Block status follows: data for present sectors, zeros, and unallocated for what the
//! parent holds ([`crate::chain`] looks there). QEMU has no block status for vhdx (`qemu-img
//! map` calls everything data); ours is what the BAT says.
//!
//! # Refused at open
//!
//! A bad file signature; no valid header (CRC-32C, as QEMU checks); a bad region table
//! (CRC-32C, signature, overlapping or misplaced regions, an unknown *required* region or
//! metadata item); invalid sizes; a BAT region too small; a present block reaching past the
//! end of the file (QEMU: "the image has probably been truncated"); and a log that needs
//! replaying: QEMU replays it on a writable open only, so we ask for `qemu-img check -r all`.
//! An entry in an unknown state fails the reads that reach it (EIO, logged).

pub mod header;
mod parent;

use std::path::Path;
use std::sync::Arc;

use crate::qcow2::{Backing, ChainOptions};
use crate::readonly::{self, co_read_extents, Extent, FileId, HostFile};
use crate::{BlockDriver, BlockError, BlockStatus, Result};
use header::{Guid, Header, Metadata, Region, MIB};

/// Payload block states. QEMU: `PAYLOAD_BLOCK_*`.
const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;
const UNMAPPED_V095: u64 = 5;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state: present. QEMU: `SB_BLOCK_PRESENT`.
const SB_PRESENT: u64 = 6;
const STATE_MASK: u64 = 7;
/// Bits 20–63: the file offset (in MiB units, so the mask keeps bytes). QEMU:
/// `VHDX_BAT_FILE_OFF_MASK`.
const OFFSET_MASK: u64 = !(MIB - 1);

/// What a payload block of the BAT says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// All of the block reads from one place (for a data block: at this file offset).
    Whole(Extent),
    /// Partially present: the block's file offset; the sector bitmap decides.
    Partial(u64),
    /// An entry in a state the format does not define here (the state).
    Bad(u64),
}

/// The vhdx format over a read-only child. QEMU: `BDRVVHDXState`.
pub struct VhdxDriver {
    file: HostFile,
    header: Header,
    meta: Metadata,
    /// The BAT, decoded (payload and sector bitmap entries, interleaved as on disk).
    bat: Vec<u64>,
    /// A differencing image's parent, opened by [`VhdxDriver::open_chain`].
    parent: Option<Backing>,
}

impl VhdxDriver {
    /// Opens a vhdx image over `child` (read-only: a writable child is refused). A
    /// differencing image is refused: its parent is found from the image's path
    /// ([`VhdxDriver::open_chain`], which [`crate::open_image`] uses).
    pub fn open(child: Arc<dyn BlockDriver>) -> Result<VhdxDriver> {
        let driver = VhdxDriver::open_node(child)?;
        if driver.meta.has_parent {
            return Err(BlockError::Invalid(
                "vhdx: a differencing image needs its path to find its parent (open_image)".into(),
            ));
        }
        Ok(driver)
    }

    /// Opens a vhdx image and, for a differencing image, its parent chain (read-only, with
    /// `opts`' cache mode and locking). `image` is the path the image was opened from; `seen`
    /// lists the files already in the chain (loops are refused).
    pub(crate) fn open_chain(
        child: Arc<dyn BlockDriver>,
        image: &Path,
        opts: &ChainOptions,
        seen: &mut Vec<FileId>,
    ) -> Result<VhdxDriver> {
        let mut driver = VhdxDriver::open_node(child)?;
        if let Some(locator) = driver
            .meta
            .parent_locator
            .clone()
            .filter(|_| driver.meta.has_parent)
        {
            let parent = parent::open(image, &locator, opts, seen).map_err(|source| {
                BlockError::Backing {
                    image: image.to_owned(),
                    source: Box::new(source),
                }
            })?;
            driver.parent = Some(parent);
        }
        Ok(driver)
    }

    /// Reads and checks everything but the parent. QEMU: `vhdx_open()`.
    fn open_node(child: Arc<dyn BlockDriver>) -> Result<VhdxDriver> {
        if !child.is_read_only() {
            return Err(BlockError::Invalid(
                "vhdx: images can only be opened read-only".into(),
            ));
        }
        let file = HostFile::new(child, "vhdx")?;
        let len = file.len();
        if len < MIB {
            return Err(BlockError::Corrupt(format!(
                "vhdx: the file ({len} bytes) is shorter than the header section (1 MiB)"
            )));
        }
        let mut sig = [0u8; 8];
        file.co_read(0, &mut sig)?;
        if &sig != header::FILE_SIGNATURE {
            return Err(BlockError::Corrupt("vhdx: bad file signature".into()));
        }
        let mut h = [
            vec![0u8; header::HEADER_SIZE],
            vec![0u8; header::HEADER_SIZE],
        ];
        for (buf, &at) in h.iter_mut().zip(&header::HEADER_OFFSETS) {
            file.co_read(at, buf)?;
        }
        let hdr = Header::current(&h[0], &h[1])?;
        let log = Region {
            offset: hdr.log_offset,
            length: u64::from(hdr.log_length),
        };
        check_log(&file, &hdr, log)?;
        let mut rt = vec![0u8; header::TABLE_SIZE];
        file.co_read(header::REGION_TABLE_OFFSET, &mut rt)?;
        let (bat_region, meta_region) = header::parse_region_table(&rt, len, log)?;
        let mut mr = vec![0u8; meta_region.length.min(len - meta_region.offset) as usize];
        file.co_read(meta_region.offset, &mut mr)?;
        let meta = Metadata::parse(&mr)?;
        let entries = meta.bat_entries();
        if entries * 8 > bat_region.length {
            return Err(BlockError::Corrupt(format!(
                "vhdx: the BAT region ({} bytes) is too small for {entries} entries",
                bat_region.length
            )));
        }
        let mut raw = vec![0u8; entries as usize * 8];
        file.co_read(bat_region.offset, &mut raw)?;
        let bat = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let driver = VhdxDriver {
            file,
            header: hdr,
            meta,
            bat,
            parent: None,
        };
        driver.check_bat()?;
        Ok(driver)
    }

    /// Every present payload block lies after the header section and inside the file.
    /// QEMU: `vhdx_check_bat_entries()`.
    fn check_bat(&self) -> Result<()> {
        let (bs, size, len) = (self.block_size(), self.meta.virtual_size, self.file.len());
        for b in 0..self.meta.data_blocks() {
            let e = self.bat[self.bat_index(b)];
            if !matches!(e & STATE_MASK, FULLY_PRESENT | PARTIALLY_PRESENT) {
                continue;
            }
            let off = e & OFFSET_MASK;
            let need = bs.min(size - b * bs);
            if off < MIB || off.checked_add(need).is_none_or(|end| end > len) {
                return Err(BlockError::Corrupt(format!(
                    "vhdx: block {b} at {off:#x} lies outside the file ({len} bytes): the image \
                     has probably been truncated"
                )));
            }
        }
        Ok(())
    }

    /// The current header's data write GUID: a differencing child names it as its parent's
    /// `parent_linkage`.
    pub fn data_write_guid(&self) -> Guid {
        self.header.data_write_guid
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    /// The BAT index of payload block `b` (sector bitmap entries interleaved). QEMU:
    /// `vhdx_block_translate()`.
    fn bat_index(&self, b: u64) -> usize {
        (b + b / self.meta.chunk_ratio()) as usize
    }

    /// What the payload block holding guest `pos` says.
    fn block_at(&self, pos: u64) -> Block {
        let bs = self.block_size();
        let e = self.bat.get(self.bat_index(pos / bs)).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        match e & STATE_MASK {
            NOT_PRESENT if self.meta.has_parent => Block::Whole(Extent::Below),
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => Block::Whole(Extent::Zero),
            FULLY_PRESENT => Block::Whole(Extent::Data(off + pos % bs)),
            PARTIALLY_PRESENT if self.meta.has_parent => Block::Partial(off),
            state => Block::Bad(state),
        }
    }

    /// The run starting at `pos`, at most `len` bytes; may read a sector bitmap.
    fn co_map(&self, pos: u64, len: u64) -> Result<(Extent, u64)> {
        let bs = self.block_size();
        match self.block_at(pos) {
            Block::Whole(first) => Ok(readonly::map_run(pos, len, bs, first, |p| {
                match self.block_at(p) {
                    Block::Whole(e) => Some(e),
                    _ => None,
                }
            })),
            Block::Partial(block_off) => self.co_map_partial(pos, len, block_off),
            Block::Bad(state) => Err(self.file.corrupt(format!(
                "block {} has state {state}, which is invalid here",
                pos / bs
            ))),
        }
    }

    /// The run starting at `pos` inside a partially present block at `block_off`: sectors
    /// whose bitmap bits agree, read from the file (set) or from the parent (clear).
    fn co_map_partial(&self, pos: u64, len: u64, block_off: u64) -> Result<(Extent, u64)> {
        let (bs, lss) = (self.block_size(), u64::from(self.meta.logical_sector_size));
        let (b, in_block) = (pos / bs, pos % bs);
        let cr = self.meta.chunk_ratio();
        let chunk = b / cr;
        let sb = self
            .bat
            .get((chunk * (cr + 1) + cr) as usize)
            .copied()
            .unwrap_or(0);
        if sb & STATE_MASK != SB_PRESENT {
            return Err(self.file.corrupt(format!(
                "block {b} is partially present but its sector bitmap is not (state {})",
                sb & STATE_MASK
            )));
        }
        // Bits of this block's sectors from `in_block` to the end of the request or block.
        let end = (in_block + len).min(bs);
        let first_bit = (b % cr) * (bs / lss) + in_block / lss;
        let last_bit = (b % cr) * (bs / lss) + end.div_ceil(lss) - 1;
        let mut bits = vec![0u8; (last_bit / 8 - first_bit / 8 + 1) as usize];
        self.file
            .co_read((sb & OFFSET_MASK).saturating_add(first_bit / 8), &mut bits)?; // near 2^64: refused by the bounds check
        let bit = |i: u64| {
            let k = i - first_bit / 8 * 8;
            bits[(k / 8) as usize] >> (k % 8) & 1 == 1
        };
        let present = bit(first_bit);
        let mut i = first_bit + 1;
        while i <= last_bit && bit(i) == present {
            i += 1;
        }
        // Bytes to the end of the run's last sector, within the request.
        let run_end = ((in_block / lss) + (i - first_bit)) * lss;
        let n = (run_end.min(end)) - in_block;
        let extent = if present {
            Extent::Data(block_off + in_block)
        } else {
            Extent::Below
        };
        Ok((extent, n))
    }

    /// Reads from the parent (zeros without one).
    fn co_read_parent(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        match &self.parent {
            Some(p) => p.co_read(pos, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// Refuses an image whose log holds entries to replay (see the module doc).
/// The largest log [`check_log`] reads (256 MiB).
const MAX_LOG_LEN: u64 = 256 << 20;

fn check_log(file: &HostFile, hdr: &Header, log: Region) -> Result<()> {
    if hdr.log_guid.is_zero() {
        return Ok(());
    }
    if log
        .offset
        .checked_add(log.length)
        .is_none_or(|end| end > file.len())
    {
        return Err(BlockError::Corrupt(format!(
            "vhdx: the log at {:#x} ({} bytes) lies beyond the end of the file",
            log.offset, log.length
        )));
    }
    // A log is a few MiB (qemu-img and Hyper-V make 1 MiB); its length field allows 4 GiB,
    // which a sparse file's length would let through. Refuse what cannot be a real log rather
    // than allocate it.
    if log.length > MAX_LOG_LEN {
        return Err(BlockError::Corrupt(format!(
            "vhdx: the log is {} bytes long, more than the {MAX_LOG_LEN} this driver reads",
            log.length
        )));
    }
    let mut bytes = vec![0u8; log.length as usize];
    file.co_read(log.offset, &mut bytes)?;
    if header::log_needs_replay(hdr.log_guid, &bytes) {
        return Err(BlockError::Invalid(
            "vhdx: the image has a log that must be replayed first (it was not closed \
             cleanly); QEMU replays it when it opens the image writable: run 'qemu-img check \
             -r all' on it"
                .into(),
        ));
    }
    Ok(())
}

impl BlockDriver for VhdxDriver {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    fn getlength(&self) -> u64 {
        self.meta.virtual_size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        readonly::check_request(offset, buf.len() as u64, self.getlength())?;
        co_read_extents(
            &self.file,
            offset,
            buf,
            |pos, len| self.co_map(pos, len),
            |pos, part| self.co_read_parent(pos, part),
        )
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

    /// Data for present blocks and sectors, zeros for the zero states, unallocated (the
    /// parent's) for the rest of a differencing image.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        readonly::check_request(offset, len, self.getlength())?;
        let (extent, n) = self.co_map(offset, len.max(1))?;
        Ok((extent.status(), n))
    }

    fn co_truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn size_granularity(&self) -> u64 {
        u64::from(self.meta.logical_sector_size)
    }

    fn close(&self) -> Result<()> {
        if let Some(p) = &self.parent {
            p.close();
        }
        self.file.close()
    }

    fn backing_node(&self) -> Option<&dyn BlockDriver> {
        self.parent.as_ref().map(|p| p.node())
    }
}
