//! The `vdi` format (VirtualBox Disk Image), read-only: static (preallocated) and dynamic
//! images.
//!
//! QEMU: `block/vdi.c` (`vdi_open()`, `vdi_co_preadv()`, `vdi_co_block_status()`); the format
//! is VirtualBox's `VDICore.h`.
//!
//! A 512-byte little-endian header at offset 0 (signature `0xbeda107f` at 0x40) gives the
//! virtual size, the block size (1 MiB in every image VirtualBox or QEMU makes) and the
//! offsets of the *block map* and of the data area. The block map has one 32-bit entry per
//! guest block: the index of the block in the data area, or `0xffffffff` (never allocated) or
//! `0xfffffffe` (discarded), both of which read as zeros. A static image has every entry
//! allocated; a dynamic one allocates blocks as they are written. The whole map is read at
//! open (4 bytes per MiB: 8 MiB for a 2 TiB disk), so a read needs no metadata I/O.
//!
//! Refused at open, with a message: other versions than 1.1, sector sizes other than 512,
//! block sizes that are not a power of two between 512 bytes and 256 MiB (QEMU takes 1 MiB
//! only), per-block extra data, differencing and undo images (a link or parent UUID, or another
//! image type), a virtual size the map does not cover, a map that does not fit in the file. A
//! map entry whose block lies outside the file fails the read that reaches it (EIO, logged).
//!
//! Like QEMU, an odd virtual size (`VBoxManage convertfromraw` makes them) is rounded up to a
//! multiple of 512.

use std::sync::Arc;

use crate::readonly::{self, co_read_extents, Extent, HostFile};
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// The header's signature, at offset 0x40. QEMU: `VDI_SIGNATURE`.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one in use. QEMU: `VDI_VERSION_1_1`.
const VERSION_1_1: u32 = 0x0001_0001;
/// Image types. QEMU: `VDI_TYPE_DYNAMIC`, `VDI_TYPE_STATIC`.
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// Map entries at or above this are not allocated (`0xfffffffe` discarded, `0xffffffff`
/// never written); both read as zeros. QEMU: `VDI_IS_ALLOCATED()`.
const FIRST_UNALLOCATED: u32 = 0xffff_fffe;
/// QEMU's limit on the number of blocks. QEMU: `VDI_BLOCKS_IN_IMAGE_MAX`.
const MAX_BLOCKS: u32 = 0x3fff_ffff;
const SECTOR: u64 = 512;

/// The header fields the driver uses, decoded. QEMU: `VdiHeader`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub image_type: u32,
    pub offset_bmap: u32,
    pub offset_data: u32,
    /// The virtual size, rounded up to 512.
    pub disk_size: u64,
    pub block_size: u32,
    pub blocks_in_image: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

impl Header {
    /// Parses and validates the first 512 bytes of a file of `file_len` bytes.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        let unsupported = |why: String| Err(BlockError::Invalid(format!("vdi: {why}")));
        if b.len() < 512 {
            return Err(BlockError::Corrupt(
                "vdi: the file is shorter than its header".into(),
            ));
        }
        if le32(b, 0x40) != SIGNATURE {
            return Err(BlockError::Corrupt("vdi: bad signature".into()));
        }
        let version = le32(b, 0x44);
        if version != VERSION_1_1 {
            return unsupported(format!(
                "version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            ));
        }
        let h = Header {
            image_type: le32(b, 0x4c),
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            disk_size: le64(b, 0x170)
                .checked_next_multiple_of(SECTOR)
                .unwrap_or(u64::MAX),
            block_size: le32(b, 0x178),
            blocks_in_image: le32(b, 0x180),
        };
        let sector_size = le32(b, 0x168);
        let block_extra = le32(b, 0x17c);
        let null_uuid = |at: usize| b[at..at + 16].iter().all(|&x| x == 0);
        if !null_uuid(0x1a8) || !null_uuid(0x1b8) {
            return unsupported(
                "differencing images (a link or parent UUID) are not supported".into(),
            );
        }
        if h.image_type != TYPE_DYNAMIC && h.image_type != TYPE_STATIC {
            return unsupported(format!(
                "image type {} is not supported (only static and dynamic)",
                h.image_type
            ));
        }
        if sector_size != SECTOR as u32 {
            return unsupported(format!(
                "sector size {sector_size} is not supported (only 512)"
            ));
        }
        if !h.block_size.is_power_of_two() || !(512..=256 << 20).contains(&h.block_size) {
            return unsupported(format!("block size {} is not supported", h.block_size));
        }
        if block_extra != 0 {
            return unsupported(format!(
                "per-block extra data ({block_extra} bytes) is not supported"
            ));
        }
        if h.blocks_in_image > MAX_BLOCKS {
            return unsupported(format!("too many blocks ({})", h.blocks_in_image));
        }
        if u64::from(h.offset_bmap) % SECTOR != 0 || u64::from(h.offset_data) % SECTOR != 0 {
            return Err(BlockError::Corrupt(format!(
                "vdi: the block map ({:#x}) or data ({:#x}) offset is not sector aligned",
                h.offset_bmap, h.offset_data
            )));
        }
        let covered = u64::from(h.blocks_in_image) * u64::from(h.block_size);
        if h.disk_size > covered {
            return Err(BlockError::Corrupt(format!(
                "vdi: the virtual size ({}) is larger than the block map covers ({covered})",
                h.disk_size
            )));
        }
        let bmap_end = u64::from(h.offset_bmap) + u64::from(h.blocks_in_image) * 4;
        if bmap_end > file_len {
            return Err(BlockError::Corrupt(format!(
                "vdi: the block map ends at {bmap_end}, beyond the end of the file ({file_len} bytes)"
            )));
        }
        Ok(h)
    }
}

/// The vdi format over a read-only child. QEMU: `BDRVVdiState`.
pub struct VdiDriver {
    file: HostFile,
    header: Header,
    /// The block map, decoded.
    bmap: Vec<u32>,
}

impl VdiDriver {
    /// Opens a vdi image over `child` (read-only: a writable child is refused). Reads the
    /// header and the block map. QEMU: `vdi_open()`.
    pub fn open(child: Arc<dyn BlockDriver>) -> Result<VdiDriver> {
        if !child.is_read_only() {
            return Err(BlockError::Invalid(
                "vdi: images can only be opened read-only".into(),
            ));
        }
        let file = HostFile::new(child, "vdi")?;
        let mut head = vec![0u8; 512];
        if file.len() < 512 {
            return Err(BlockError::Corrupt(
                "vdi: the file is shorter than its header".into(),
            ));
        }
        file.co_read(0, &mut head)?;
        let header = Header::parse(&head, file.len())?;
        // Only the entries of blocks inside the disk: a header may claim up to MAX_BLOCKS, and
        // a sparse file is long enough to pass the bounds check for free, so the table's size
        // must not come from that field alone.
        let used = header
            .disk_size
            .div_ceil(u64::from(header.block_size))
            .min(u64::from(header.blocks_in_image));
        let mut raw = vec![0u8; used as usize * 4];
        file.co_read(u64::from(header.offset_bmap), &mut raw)?;
        let bmap = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(VdiDriver { file, header, bmap })
    }

    /// The header as opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Where guest `pos` reads from (the block map entry decoded).
    fn extent_at(&self, pos: u64) -> Extent {
        let bs = self.block_size();
        match self.bmap.get((pos / bs) as usize) {
            Some(&e) if e < FIRST_UNALLOCATED => {
                Extent::Data(u64::from(self.header.offset_data) + u64::from(e) * bs + pos % bs)
            }
            _ => Extent::Zero,
        }
    }

    /// The run starting at `pos`, at most `len` bytes.
    fn map(&self, pos: u64, len: u64) -> (Extent, u64) {
        readonly::map_run(pos, len, self.block_size(), self.extent_at(pos), |p| {
            Some(self.extent_at(p))
        })
    }
}

impl BlockDriver for VdiDriver {
    fn format_name(&self) -> &'static str {
        "vdi"
    }

    fn getlength(&self) -> u64 {
        self.header.disk_size
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
            |pos, len| Ok(self.map(pos, len)),
            |_, part| {
                part.fill(0);
                Ok(())
            },
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

    /// Allocated blocks are data, the others zeros. QEMU: `vdi_co_block_status()`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        readonly::check_request(offset, len, self.getlength())?;
        let (extent, n) = self.map(offset, len.max(1));
        Ok((extent.status(), n))
    }

    fn co_truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn size_granularity(&self) -> u64 {
        SECTOR
    }

    fn close(&self) -> Result<()> {
        self.file.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0x40, &SIGNATURE.to_le_bytes());
        put(0x44, &VERSION_1_1.to_le_bytes());
        put(0x4c, &TYPE_DYNAMIC.to_le_bytes());
        put(0x154, &512u32.to_le_bytes());
        put(0x158, &1024u32.to_le_bytes());
        put(0x168, &512u32.to_le_bytes());
        put(0x170, &(3u64 << 20).to_le_bytes());
        put(0x178, &(1u32 << 20).to_le_bytes());
        put(0x180, &3u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_refuses() {
        let b = header();
        let h = Header::parse(&b, 4096).expect("valid");
        assert_eq!((h.disk_size, h.blocks_in_image), (3 << 20, 3));
        let with = |at: usize, v: &[u8]| {
            let mut c = b.clone();
            c[at..at + v.len()].copy_from_slice(v);
            Header::parse(&c, 4096)
        };
        assert!(with(0x40, &[0; 4]).is_err(), "signature");
        assert!(with(0x178, &1000u32.to_le_bytes()).is_err(), "block size");
        assert!(
            with(0x170, &(4u64 << 20).to_le_bytes()).is_err(),
            "size beyond the map"
        );
        assert!(with(0x1b8, &[1]).is_err(), "parent uuid");
        assert!(with(0x180, &u32::MAX.to_le_bytes()).is_err(), "huge map");
        assert!(Header::parse(&b, 520).is_err(), "map past the end");
        let odd = with(0x170, &1000u64.to_le_bytes()).expect("odd size");
        assert_eq!(odd.disk_size, 1024, "rounded up as QEMU does");
    }
}
