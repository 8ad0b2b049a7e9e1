//! The binary header of a hosted sparse extent (`KDMV`), the footer of a stream-optimized one,
//! and the checks that turn the header's numbers into a [`Geometry`] we can trust.
//!
//! QEMU: `VMDK4Header` and `vmdk_open_vmdk4()` in `block/vmdk.c`; the format is VMware's
//! "Virtual Disk Format 1.1" specification (`SparseExtentHeader`, "Stream-Optimized Compressed
//! Sparse Extents").
//!
//! The header is one 512-byte sector, little endian (the magic reads "KDMV" on disk):
//!
//! ```text
//!   0 magic "KDMV"          4 version (1..=3)      8 flags
//!  12 capacity (sectors)   20 grainSize (sectors) 28 descriptorOffset (sectors)
//!  36 descriptorSize       44 numGTEsPerGT        48 rgdOffset (redundant grain directory)
//!  56 gdOffset             64 overHead (sectors before the first grain)
//!  72 uncleanShutdown      73 '\n' ' ' '\r' '\n' (newline detection)   77 compressAlgorithm
//! ```
//!
//! A stream-optimized extent written in one pass (VMware's `ovftool`) does not know where its
//! grain directory will be when it writes the header: `gdOffset` is then [`GD_AT_END`] and the
//! real header is repeated in a *footer* — a footer marker sector, the header sector, an
//! end-of-stream marker sector — in the file's last 1536 bytes. QEMU's own stream-optimized
//! images put the directory in the header.

use crate::{BlockError, Result};

/// Bytes per sector: every offset and size in a VMDK header counts these.
pub const SECTOR: u64 = 512;
/// The first four bytes of a hosted sparse extent.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// The first four bytes of a VMware 3 / ESX `vmfsSparse` extent (not supported).
pub const COWD_MAGIC: &[u8; 4] = b"COWD";

/// The newline-detection bytes at 73..77 are meaningful.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// A redundant grain directory exists (at `rgdOffset`); we read the primary one, as QEMU.
pub const FLAG_RGD: u32 = 1 << 1;
/// A grain table entry of 1 means "this grain reads as zeros". QEMU: `VMDK4_FLAG_ZERO_GRAIN`.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are deflate-compressed. QEMU: `VMDK4_FLAG_COMPRESS`.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Every grain starts with a grain marker (lba, size). QEMU: `VMDK4_FLAG_MARKER`.
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `gdOffset` of a stream-optimized header whose real values are in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm`: none.
pub const COMPRESSION_NONE: u16 = 0;
/// `compressAlgorithm`: deflate in a zlib wrapper (RFC 1950), one stream per grain.
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Largest grain QEMU accepts: 1 GiB ("unrealistic", but allowed).
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain table QEMU accepts (VMware always uses 512 entries).
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest grain directory QEMU accepts, in entries (a 128 MiB table).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Largest virtual size: the byte size must fit an `i64`, as QEMU's.
pub const MAX_CAPACITY_SECTORS: u64 = (i64::MAX as u64) / SECTOR;

/// The footer: marker sector, header sector, end-of-stream marker sector.
pub const FOOTER_LEN: u64 = 3 * SECTOR;
/// Marker types (the `u32` after a marker's zero `size`). QEMU: `MARKER_*`.
pub const MARKER_END_OF_STREAM: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;
/// A grain marker: `lba` (u64) and `size` (u32) before the compressed bytes.
pub const GRAIN_MARKER_LEN: u64 = 12;

/// The header's fields, as read; nothing checked but the magic. QEMU: `VMDK4Header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Virtual size of the extent, in sectors.
    pub capacity: u64,
    /// Sectors per grain (QEMU: `granularity`).
    pub grain_sectors: u64,
    /// Where the embedded descriptor is (0: none), and its length, in sectors.
    pub desc_offset: u64,
    pub desc_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    /// Where the grain directory is, in sectors; [`GD_AT_END`]: see the footer.
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain (QEMU: `grain_offset`).
    pub overhead: u64,
    /// The four newline-detection bytes.
    pub newline_bytes: [u8; 4],
    pub compression: u16,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseHeader {
    /// Reads the header sector `sector` (at least 79 bytes; shorter input is an error).
    pub fn parse(sector: &[u8]) -> Result<SparseHeader> {
        if sector.len() < 79 {
            return Err(BlockError::Corrupt(
                "vmdk: the file is too short for a sparse extent header".into(),
            ));
        }
        if &sector[..4] == COWD_MAGIC {
            return Err(BlockError::Invalid(
                "vmdk: VMware 3 / vmfsSparse (COWD) extents are not supported".into(),
            ));
        }
        if &sector[..4] != MAGIC {
            return Err(BlockError::Corrupt(
                "vmdk: not a sparse extent (no KDMV magic)".into(),
            ));
        }
        Ok(SparseHeader {
            version: le_u32(sector, 4),
            flags: le_u32(sector, 8),
            capacity: le_u64(sector, 12),
            grain_sectors: le_u64(sector, 20),
            desc_offset: le_u64(sector, 28),
            desc_size: le_u64(sector, 36),
            gtes_per_gt: le_u32(sector, 44),
            rgd_offset: le_u64(sector, 48),
            gd_offset: le_u64(sector, 56),
            overhead: le_u64(sector, 64),
            newline_bytes: [sector[73], sector[74], sector[75], sector[76]],
            compression: le_u16(sector, 77),
        })
    }

    /// The header kept in a stream-optimized extent's footer (the file's last
    /// [`FOOTER_LEN`] bytes), after checking the two markers around it as QEMU does.
    pub fn parse_footer(footer: &[u8]) -> Result<SparseHeader> {
        let bad = |why: &str| BlockError::Corrupt(format!("vmdk: invalid footer: {why}"));
        if footer.len() < FOOTER_LEN as usize {
            return Err(bad("the file is too short"));
        }
        let (marker, rest) = footer.split_at(SECTOR as usize);
        let (header, eos) = rest.split_at(SECTOR as usize);
        if le_u32(marker, 8) != 0 || le_u32(marker, 12) != MARKER_FOOTER {
            return Err(bad("no footer marker"));
        }
        if le_u64(eos, 0) != 0 || le_u32(eos, 8) != 0 || le_u32(eos, 12) != MARKER_END_OF_STREAM {
            return Err(bad("no end-of-stream marker after it"));
        }
        if &header[..4] != MAGIC {
            return Err(bad("no KDMV magic"));
        }
        let h = SparseHeader::parse(header)?;
        if h.gd_offset == GD_AT_END {
            return Err(bad("it points at itself for the grain directory"));
        }
        Ok(h)
    }

    fn flag(&self, f: u32) -> bool {
        self.flags & f != 0
    }

    /// Checks the header against the file's length (`file_len` bytes) and QEMU's limits;
    /// returns the extent's geometry. Unsupported variants are [`BlockError::Invalid`],
    /// impossible numbers [`BlockError::Corrupt`]. QEMU: the checks of `vmdk_open_vmdk4()`
    /// and `vmdk_add_extent()`, plus one of ours: the grain directory must lie inside the file.
    pub fn geometry(&self, file_len: u64) -> Result<Geometry> {
        let corrupt = |why: String| BlockError::Corrupt(format!("vmdk: {why}"));
        if self.version == 0 || self.version > 3 {
            return Err(BlockError::Invalid(format!(
                "vmdk: sparse extent version {} is not supported (1 to 3 are)",
                self.version
            )));
        }
        let compressed = match self.compression {
            COMPRESSION_NONE => false,
            COMPRESSION_DEFLATE => true,
            other => {
                return Err(BlockError::Invalid(format!(
                    "vmdk: compression algorithm {other} is not supported (deflate is)"
                )))
            }
        };
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(corrupt(format!(
                "{} grain table entries per grain table (1 to {MAX_GTES_PER_GT} allowed)",
                self.gtes_per_gt
            )));
        }
        if self.grain_sectors == 0 || self.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(corrupt(format!(
                "a grain of {} sectors (1 to {MAX_GRAIN_SECTORS} allowed)",
                self.grain_sectors
            )));
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return Err(corrupt(format!(
                "a capacity of {} sectors is too large",
                self.capacity
            )));
        }
        let file_sectors = file_len / SECTOR;
        if self.overhead > file_sectors {
            return Err(corrupt(format!(
                "the file is truncated: the header says grains start at {} bytes, the file \
                 has {file_len}",
                self.overhead.saturating_mul(SECTOR)
            )));
        }
        let gt_span = u64::from(self.gtes_per_gt) * self.grain_sectors; // ≤ 2^30
        let gd_entries = self.capacity.div_ceil(gt_span);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(corrupt(format!(
                "a grain directory of {gd_entries} entries is too large"
            )));
        }
        let gd_bytes = gd_entries * 4;
        let gd_offset = self
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|&o| o > 0 || gd_entries == 0)
            .ok_or_else(|| corrupt(format!("grain directory at sector {}", self.gd_offset)))?;
        if gd_offset.saturating_add(gd_bytes) > file_len {
            return Err(corrupt(format!(
                "the grain directory ({gd_bytes} bytes at {gd_offset:#x}) is beyond the end of \
                 the file ({file_len} bytes)"
            )));
        }
        Ok(Geometry {
            capacity: self.capacity * SECTOR,
            grain_size: self.grain_sectors * SECTOR,
            gtes_per_gt: self.gtes_per_gt,
            gd_offset,
            gd_entries,
            compressed,
            markers: self.flag(FLAG_MARKERS),
            zero_grain: self.flag(FLAG_ZERO_GRAIN),
        })
    }

    /// Whether the newline-detection bytes say the file went through a text-mode transfer
    /// (which turns `\n` into `\r\n` and shifts everything after). Only meaningful with
    /// [`FLAG_NL_DETECT`]; QEMU does not check, so neither do we refuse: we warn.
    pub fn newlines_mangled(&self) -> bool {
        self.flag(FLAG_NL_DETECT) && self.newline_bytes != *b"\n \r\n"
    }
}

/// What a sparse extent's header promises, checked: sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size of the extent.
    pub capacity: u64,
    /// Bytes per grain.
    pub grain_size: u64,
    pub gtes_per_gt: u32,
    /// Byte offset of the grain directory (inside the file).
    pub gd_offset: u64,
    /// Entries in the grain directory: enough grain tables to cover `capacity`.
    pub gd_entries: u64,
    /// Grains are zlib streams (stream-optimized).
    pub compressed: bool,
    /// Every grain starts with a grain marker.
    pub markers: bool,
    /// A grain table entry of 1 means zeros.
    pub zero_grain: bool,
}

impl Geometry {
    /// Bytes of guest data one grain table covers.
    pub fn gt_span(&self) -> u64 {
        u64::from(self.gtes_per_gt) * self.grain_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A monolithicSparse header as `qemu-img create -f vmdk IMG 5G` writes it.
    fn qemu_header() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&3u32.to_le_bytes());
        h[12..20].copy_from_slice(&(10u64 << 20).to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[48..56].copy_from_slice(&21u64.to_le_bytes());
        h[56..64].copy_from_slice(&663u64.to_le_bytes());
        h[64..72].copy_from_slice(&1408u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }

    #[test]
    fn qemu_header_parses() {
        let h = SparseHeader::parse(&qemu_header()).expect("valid");
        assert!(!h.newlines_mangled());
        let g = h.geometry(1408 * 512).expect("valid geometry");
        assert_eq!(g.capacity, 5 << 30);
        assert_eq!(g.grain_size, 65536);
        assert_eq!(g.gd_entries, 160);
        assert_eq!(g.gd_offset, 663 * 512);
        assert!(!g.compressed && !g.markers && !g.zero_grain);
    }

    #[test]
    fn bad_numbers_are_refused() {
        let base = SparseHeader::parse(&qemu_header()).expect("valid");
        let len = 1408 * 512;
        let bad = [
            SparseHeader { version: 4, ..base },
            SparseHeader {
                compression: 2,
                ..base
            },
            SparseHeader {
                gtes_per_gt: 0,
                ..base
            },
            SparseHeader {
                gtes_per_gt: 513,
                ..base
            },
            SparseHeader {
                grain_sectors: 0,
                ..base
            },
            SparseHeader {
                grain_sectors: MAX_GRAIN_SECTORS + 1,
                ..base
            },
            SparseHeader {
                capacity: u64::MAX,
                ..base
            },
            SparseHeader {
                capacity: 1 << 60,
                grain_sectors: 1,
                gtes_per_gt: 1,
                ..base
            },
            SparseHeader {
                gd_offset: 0,
                ..base
            },
            SparseHeader {
                gd_offset: 1408,
                ..base
            },
            SparseHeader {
                gd_offset: u64::MAX / 2,
                ..base
            },
            SparseHeader {
                overhead: 1409,
                ..base
            },
        ];
        for h in bad {
            assert!(h.geometry(len).is_err(), "{h:?} accepted");
        }
        assert!(SparseHeader::parse(b"COWD").is_err());
        let mut cowd = qemu_header();
        cowd[..4].copy_from_slice(COWD_MAGIC);
        let e = SparseHeader::parse(&cowd).expect_err("COWD");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn footer_needs_both_markers() {
        let mut footer = vec![0u8; FOOTER_LEN as usize];
        footer[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        let mut h = qemu_header();
        h[56..64].copy_from_slice(&30u64.to_le_bytes());
        footer[512..1024].copy_from_slice(&h);
        assert_eq!(
            SparseHeader::parse_footer(&footer)
                .expect("valid")
                .gd_offset,
            30
        );
        let mut no_eos = footer.clone();
        no_eos[1024 + 12] = 1;
        assert!(SparseHeader::parse_footer(&no_eos).is_err());
        let mut no_marker = footer.clone();
        no_marker[12] = 0;
        assert!(SparseHeader::parse_footer(&no_marker).is_err());
        let mut again = footer;
        again[512 + 56..512 + 64].copy_from_slice(&GD_AT_END.to_le_bytes());
        assert!(SparseHeader::parse_footer(&again).is_err());
    }
}
