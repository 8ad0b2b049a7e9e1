//! The `vpc` format (Virtual PC / Hyper-V VHD), read-only: fixed and dynamic images.
//!
//! QEMU: `block/vpc.c` (`vpc_open()`, `vpc_ignore_current_size()`, `vpc_co_preadv()`,
//! `vpc_co_block_status()`); the format is Microsoft's "Virtual Hard Disk Image Format
//! Specification".
//!
//! Every VHD ends with a 512-byte big-endian *footer* (cookie `conectix`, a checksum, the disk
//! type, the size twice over: as CHS geometry and as `current_size`). A **fixed** image is the
//! disk's bytes followed by the footer. A **dynamic** image starts with a copy of the footer,
//! then a *dynamic disk header* (`cxsparse`) that locates the *block allocation table* (BAT):
//! one big-endian 32-bit sector number per block (2 MiB by default), `0xffffffff` for a block
//! never written (zeros). An allocated block is a sector bitmap (rounded up to 512 bytes) and
//! then the block's data; like QEMU we read an allocated block whole and ignore the bitmap (it
//! only matters for differencing images, which are refused).
//!
//! # The size
//!
//! Virtual PC sizes a disk by its CHS geometry (cylinders × heads × sectors, usually a little
//! less than `current_size`); Hyper-V and most other tools by `current_size`. We pick as QEMU
//! does, so the size equals `qemu-img info`'s: `current_size` when the creator application is
//! `win ` (Hyper-V), `qem2` (QEMU with `force_size=on`), `d2v ` (Disk2vhd), `CTXS`
//! (XenConverter) or `tap\0` (XenServer), or when the geometry is the maximum
//! (65535 × 16 × 255, meaning "too big for CHS"); otherwise (`vpc `, `qemu`, anything else)
//! the geometry. More than 2040 GiB is refused, as QEMU does.
//!
//! # Probing
//!
//! QEMU's probe looks for the cookie at offset 0 only, so `qemu-img` takes a fixed VHD for a
//! raw image (with the footer as its last 512 bytes). We also recognise a fixed image by its
//! footer at the end — cookie, valid checksum, disk type fixed ([`is_fixed_footer`]) — so that
//! `coro-fuse disk.vhd` exports the disk and not the footer.
//!
//! # Checks
//!
//! At open: the footer's checksum (QEMU checks it too), the disk type (differencing images
//! are refused: their parent is not supported), a fixed image's data fitting in the file, the
//! dynamic header's cookie, a power-of-two block size, a BAT covering the size and lying in the
//! file, and every allocated block lying in the file (QEMU: "the image has been truncated").

use std::sync::Arc;

use crate::readonly::{self, co_read_extents, Extent, HostFile};
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const SECTOR: u64 = 512;
/// Disk types. QEMU: `enum vhd_type`.
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
/// The geometry that means "use `current_size`". QEMU: `VHD_MAX_GEOMETRY`.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// 2040 GiB in sectors. QEMU: `VHD_MAX_SECTORS`.
const MAX_SECTORS: u64 = 0xff00_0000;
/// A BAT entry of a block never written.
const UNALLOCATED: u32 = 0xffff_ffff;
/// Creator applications whose images are sized by `current_size`. QEMU:
/// `vpc_ignore_current_size()`.
const SIZED_BY_CURRENT_SIZE: &[&[u8; 4]] = &[b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from(be32(b, at)) << 32 | u64::from(be32(b, at + 4))
}

/// The ones' complement of the byte sum of `b` with the 4 bytes at `skip` taken as zeros.
/// QEMU: `vpc_checksum()`.
fn checksum(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// The footer fields the driver uses, decoded. QEMU: `VHDFooter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub data_offset: u64,
    pub creator_app: [u8; 4],
    pub current_size: u64,
    /// Cylinders × heads × sectors per track.
    pub chs_sectors: u64,
    pub disk_type: u32,
}

impl Footer {
    /// Parses a footer and checks its cookie and checksum.
    pub fn parse(b: &[u8]) -> Result<Footer> {
        if b.len() < FOOTER_LEN || &b[..8] != COOKIE {
            return Err(BlockError::Corrupt(
                "vpc: no footer (cookie 'conectix')".into(),
            ));
        }
        let b = &b[..FOOTER_LEN];
        let stored = be32(b, 64);
        if checksum(b, 64) != stored {
            return Err(BlockError::Corrupt(format!(
                "vpc: footer checksum {stored:#x} is wrong (computed {:#x})",
                checksum(b, 64)
            )));
        }
        Ok(Footer {
            data_offset: be64(b, 16),
            creator_app: [b[28], b[29], b[30], b[31]],
            current_size: be64(b, 48),
            chs_sectors: u64::from(be16(b, 56)) * u64::from(b[58]) * u64::from(b[59]),
            disk_type: be32(b, 60),
        })
    }

    /// The virtual size in bytes by QEMU's rule (module doc), or an error above 2040 GiB.
    pub fn virtual_size(&self) -> Result<u64> {
        let by_current_size = SIZED_BY_CURRENT_SIZE.contains(&&self.creator_app);
        let sectors = if by_current_size || self.chs_sectors == MAX_GEOMETRY {
            self.current_size / SECTOR
        } else {
            self.chs_sectors
        };
        if sectors > MAX_SECTORS {
            return Err(BlockError::Invalid(format!(
                "vpc: the disk is larger than 2040 GiB ({sectors} sectors)"
            )));
        }
        Ok(sectors * SECTOR)
    }
}

/// Whether `tail` (the last 512 bytes of a file) is the footer of a fixed VHD: the probe of
/// [`crate::probe`] for images without a footer copy at offset 0.
pub fn is_fixed_footer(tail: &[u8]) -> bool {
    Footer::parse(tail).is_ok_and(|f| f.disk_type == TYPE_FIXED)
}

/// The layout of a dynamic image.
struct Dynamic {
    block_size: u64,
    /// Bytes of the sector bitmap before each block's data.
    bitmap_size: u64,
    /// The BAT, decoded.
    bat: Vec<u32>,
}

/// The vpc format over a read-only child. QEMU: `BDRVVPCState`.
pub struct VpcDriver {
    file: HostFile,
    footer: Footer,
    size: u64,
    /// `None` for a fixed image.
    dynamic: Option<Dynamic>,
}

impl VpcDriver {
    /// Opens a VHD over `child` (read-only: a writable child is refused): the footer at
    /// offset 0 (dynamic) or at the end (fixed), and for a dynamic image its header and BAT.
    /// QEMU: `vpc_open()`.
    pub fn open(child: Arc<dyn BlockDriver>) -> Result<VpcDriver> {
        if !child.is_read_only() {
            return Err(BlockError::Invalid(
                "vpc: images can only be opened read-only".into(),
            ));
        }
        let file = HostFile::new(child, "vpc")?;
        let len = file.len();
        if len < FOOTER_LEN as u64 {
            return Err(BlockError::Corrupt(
                "vpc: the file is too small for a footer".into(),
            ));
        }
        let mut b = vec![0u8; FOOTER_LEN];
        file.co_read(0, &mut b)?;
        let at_start = &b[..8] == COOKIE;
        if !at_start {
            file.co_read(len - FOOTER_LEN as u64, &mut b)?;
        }
        let footer = Footer::parse(&b)?;
        let size = footer.virtual_size()?;
        let dynamic = match (footer.disk_type, at_start) {
            (TYPE_FIXED, false) => {
                let data = len - FOOTER_LEN as u64;
                if size > data {
                    return Err(BlockError::Corrupt(format!(
                        "vpc: the fixed disk of {size} bytes does not fit in the file ({data} \
                         bytes before the footer): the image has been truncated"
                    )));
                }
                None
            }
            (TYPE_DYNAMIC, true) => Some(open_dynamic(&file, &footer, size)?),
            (TYPE_DIFFERENCING, _) => {
                return Err(BlockError::Invalid(
                    "vpc: differencing images are not supported".into(),
                ))
            }
            (TYPE_FIXED | TYPE_DYNAMIC, _) => {
                return Err(BlockError::Corrupt(format!(
                    "vpc: disk type {} with the footer at the {}",
                    footer.disk_type,
                    if at_start {
                        "start (a dynamic image's copy)"
                    } else {
                        "end only"
                    }
                )))
            }
            (t, _) => return Err(BlockError::Corrupt(format!("vpc: unknown disk type {t}"))),
        };
        Ok(VpcDriver {
            file,
            footer,
            size,
            dynamic,
        })
    }

    /// The footer as opened.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Whether the image is fixed (else dynamic).
    pub fn is_fixed(&self) -> bool {
        self.dynamic.is_none()
    }

    /// The run starting at `pos`, at most `len` bytes.
    fn map(&self, pos: u64, len: u64) -> (Extent, u64) {
        let Some(d) = &self.dynamic else {
            return (Extent::Data(pos), len);
        };
        let extent_at = |p: u64| match d.bat.get((p / d.block_size) as usize) {
            Some(&e) if e != UNALLOCATED => {
                Extent::Data(u64::from(e) * SECTOR + d.bitmap_size + p % d.block_size)
            }
            _ => Extent::Zero,
        };
        readonly::map_run(pos, len, d.block_size, extent_at(pos), |p| {
            Some(extent_at(p))
        })
    }
}

/// Reads the dynamic disk header and the BAT, and checks that every block lies in the file.
fn open_dynamic(file: &HostFile, footer: &Footer, size: u64) -> Result<Dynamic> {
    let corrupt = |why: String| Err(BlockError::Corrupt(format!("vpc: {why}")));
    let mut h = vec![0u8; DYN_HEADER_LEN];
    if footer.data_offset.saturating_add(DYN_HEADER_LEN as u64) > file.len() {
        return corrupt(format!(
            "the dynamic disk header offset {:#x} is beyond the end of the file",
            footer.data_offset
        ));
    }
    file.co_read(footer.data_offset, &mut h)?;
    if &h[..8] != DYN_COOKIE {
        return corrupt("bad dynamic disk header cookie (not 'cxsparse')".into());
    }
    let table_offset = be64(&h, 16);
    let entries = be32(&h, 28);
    let block_size = u64::from(be32(&h, 32));
    if !block_size.is_power_of_two() || block_size < SECTOR {
        return corrupt(format!("invalid block size {block_size}"));
    }
    if u64::from(entries) * block_size < size {
        return corrupt(format!(
            "the block table ({entries} entries of {block_size} bytes) does not cover the disk \
             ({size} bytes)"
        ));
    }
    let table_end = table_offset.checked_add(u64::from(entries) * 4);
    if table_end.is_none_or(|end| end > file.len()) {
        return corrupt(format!(
            "the block table at {table_offset:#x} ({entries} entries) is beyond the end of the file"
        ));
    }
    // Only the entries of blocks inside the disk (the check above makes them ≤ `entries`): a
    // header may claim 2^32 entries, and a sparse file passes the bounds check for free.
    let used = size.div_ceil(block_size).min(u64::from(entries));
    let mut raw = vec![0u8; used as usize * 4];
    file.co_read(table_offset, &mut raw)?;
    let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
    let bitmap_size = (block_size / (8 * SECTOR)).next_multiple_of(SECTOR);
    for (i, &e) in bat.iter().enumerate() {
        let end = u64::from(e) * SECTOR + bitmap_size + block_size;
        if e != UNALLOCATED && end > file.len() {
            return corrupt(format!(
                "block {i} ends at {end}, beyond the end of the file ({} bytes): the image has \
                 been truncated",
                file.len()
            ));
        }
    }
    Ok(Dynamic {
        block_size,
        bitmap_size,
        bat,
    })
}

impl BlockDriver for VpcDriver {
    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn getlength(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        readonly::check_request(offset, buf.len() as u64, self.size)?;
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

    /// A fixed image is data throughout; a dynamic one has data in its allocated blocks and
    /// zeros elsewhere. QEMU: `vpc_co_block_status()`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        readonly::check_request(offset, len, self.size)?;
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

    fn footer(app: &[u8; 4], current: u64, chs: (u16, u8, u8), ty: u32) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(COOKIE);
        b[28..32].copy_from_slice(app);
        b[48..56].copy_from_slice(&current.to_be_bytes());
        b[56..58].copy_from_slice(&chs.0.to_be_bytes());
        b[58] = chs.1;
        b[59] = chs.2;
        b[60..64].copy_from_slice(&ty.to_be_bytes());
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn size_rule() {
        let chs = (20, 16, 63); // 20160 sectors
        let size = |app| {
            Footer::parse(&footer(app, 10 << 20, chs, 3))
                .unwrap()
                .virtual_size()
        };
        assert_eq!(size(b"qemu").ok(), Some(20160 * 512), "qemu: CHS");
        assert_eq!(size(b"vpc ").ok(), Some(20160 * 512), "Virtual PC: CHS");
        assert_eq!(size(b"win ").ok(), Some(10 << 20), "Hyper-V: current_size");
        assert_eq!(
            size(b"qem2").ok(),
            Some(10 << 20),
            "force_size: current_size"
        );
        let max = Footer::parse(&footer(b"qemu", 3 << 40, (65535, 16, 255), 3)).unwrap();
        assert!(max.virtual_size().is_err(), "beyond 2040 GiB");
        let max = Footer::parse(&footer(b"qemu", 1 << 40, (65535, 16, 255), 3)).unwrap();
        assert_eq!(
            max.virtual_size().ok(),
            Some(1 << 40),
            "max geometry: current_size"
        );
    }

    #[test]
    fn checksum_and_probe() {
        let mut b = footer(b"qemu", 1 << 20, (20, 4, 17), TYPE_FIXED);
        assert!(is_fixed_footer(&b));
        assert!(!is_fixed_footer(&footer(
            b"qemu",
            1 << 20,
            (20, 4, 17),
            TYPE_DYNAMIC
        )));
        b[100] ^= 1;
        assert!(Footer::parse(&b).is_err(), "bad checksum");
        assert!(!is_fixed_footer(&b));
        assert!(!is_fixed_footer(&[0u8; 512]));
    }
}
