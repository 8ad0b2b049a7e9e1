//! The on-disk structures of a vhdx file up to the block allocation table: the file
//! identifier, the two headers, the region table, the metadata table and its items (file
//! parameters, sizes, the parent locator), and the check for a log that needs replaying.
//!
//! QEMU: `block/vhdx.c` (`vhdx_parse_header()`, `vhdx_open_region_tables()`,
//! `vhdx_parse_metadata()`), `block/vhdx.h` (the layouts, the GUIDs), `block/vhdx-log.c`
//! (`vhdx_log_hdr_is_valid()`), `util/crc32c.c`. Everything is little endian; the parsers take
//! byte slices and return typed values or [`BlockError`]s, never panic.
//!
//! ```text
//!  0      64K      128K     192K     256K     320K .. 1M      (then, 1 MiB aligned)
//!  | ident | header1 | header2 | region1 | region2 | reserved | log | metadata | BAT | blocks
//! ```

use crate::{BlockError, Result};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// `vhdxfile` at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// The header checksum covers this many bytes. QEMU: `VHDX_HEADER_SIZE`.
pub const HEADER_SIZE: usize = 4096;
/// The region table QEMU reads (the copy at 256 KiB is not read, as in QEMU).
pub const REGION_TABLE_OFFSET: u64 = 192 * KIB;
/// Region and metadata tables are 64 KiB (the checksum covers the region table's 64 KiB).
pub const TABLE_SIZE: usize = 64 * 1024;
/// At most this many region table entries (spec).
const MAX_REGION_ENTRIES: u32 = 2047;
/// Block sizes, spec limits. QEMU: `VHDX_BLOCK_SIZE_MIN`, `_MAX`.
const BLOCK_SIZE_MIN: u32 = 1 << 20;
const BLOCK_SIZE_MAX: u32 = 256 << 20;
/// The largest virtual disk (spec: 64 TiB).
const MAX_DISK_SIZE: u64 = 64 << 40;
/// Log sectors are 4 KiB.
const LOG_SECTOR: u64 = 4096;

/// A GUID as stored: the first three fields little endian, the last 8 bytes as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The GUID written `{d1-d2-d3-d4[0..2]-d4[2..8]}`, as in a parent locator.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    pub fn read(b: &[u8], at: usize) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        Guid(g)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The registry form, `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` (upper case).
    pub fn to_braced(self) -> String {
        let g = self.0;
        let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
        let d2 = u16::from_le_bytes([g[4], g[5]]);
        let d3 = u16::from_le_bytes([g[6], g[7]]);
        let tail: String = g[10..].iter().map(|x| format!("{x:02X}")).collect();
        format!(
            "{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{tail}}}",
            g[8], g[9]
        )
    }
}

/// Region: the block allocation table.
pub const BAT_GUID: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Region: the metadata.
pub const METADATA_GUID: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
/// Metadata items.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE_83: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// The parent locator type of a vhdx parent.
pub const PARENT_TYPE_VHDX: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

fn corrupt<T>(why: String) -> Result<T> {
    Err(BlockError::Corrupt(format!("vhdx: {why}")))
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), as the headers, region tables and
/// log entries use. QEMU: `crc32c()` of `util/crc32c.c`, seeded with `0xffffffff` and
/// inverted at the end.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Whether the CRC-32C of `b`, with its 4-byte checksum field at `at` taken as zeros, equals
/// the stored one. QEMU: `vhdx_checksum_is_valid()`.
pub fn checksum_ok(b: &[u8], at: usize) -> bool {
    let mut copy = b.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == le32(b, at)
}

/// One of the two headers. QEMU: `VHDXHeader`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// The header in the 4 KiB `b`, if its checksum, signature and version are valid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != b"head" || !checksum_ok(&b[..HEADER_SIZE], 4) {
            return None;
        }
        if le16(b, 66) != 1 {
            return None;
        }
        Some(Header {
            sequence_number: le64(b, 8),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// The current header of the two (`None`: invalid): the valid one with the higher
    /// sequence number; two valid headers with the same number must be identical (Disk2VHD
    /// writes them so). QEMU: `vhdx_parse_header()`.
    pub fn current(h1: &[u8], h2: &[u8]) -> Result<Header> {
        match (Header::parse(h1), Header::parse(h2)) {
            (Some(a), None) => Ok(a),
            (None, Some(b)) => Ok(b),
            (Some(a), Some(b)) if a.sequence_number > b.sequence_number => Ok(a),
            (Some(a), Some(b)) if b.sequence_number > a.sequence_number => Ok(b),
            (Some(a), Some(_)) if h1[..HEADER_SIZE] == h2[..HEADER_SIZE] => Ok(a),
            (Some(_), Some(_)) => {
                corrupt("the two headers differ but have the same sequence number".into())
            }
            (None, None) => corrupt("no valid header (bad checksums or signatures)".into()),
        }
    }
}

/// A region: where the BAT or the metadata lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
}

/// The BAT and metadata regions of the region table in the 64 KiB `b`. Unknown regions are
/// skipped unless marked required; regions must be 1 MiB aligned, past the header section,
/// inside the file and not overlap each other or the log. QEMU: `vhdx_open_region_tables()`.
pub fn parse_region_table(b: &[u8], file_len: u64, log: Region) -> Result<(Region, Region)> {
    if b.len() < TABLE_SIZE || &b[..4] != b"regi" || !checksum_ok(&b[..TABLE_SIZE], 4) {
        return corrupt("bad region table (checksum or signature)".into());
    }
    let count = le32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return corrupt(format!(
            "{count} region table entries (at most {MAX_REGION_ENTRIES})"
        ));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<Region> = Vec::new();
    if log.length > 0 {
        seen.push(log);
    }
    for i in 0..count as usize {
        let e = 16 + i * 32;
        let guid = Guid::read(b, e);
        let r = Region {
            offset: le64(b, e + 16),
            length: u64::from(le32(b, e + 24)),
        };
        let required = le32(b, e + 28) & 1 != 0;
        check_region(r, file_len, &seen)?;
        seen.push(r);
        let slot = if guid == BAT_GUID {
            &mut bat
        } else if guid == METADATA_GUID {
            &mut meta
        } else if required {
            return Err(BlockError::Invalid(format!(
                "vhdx: the image needs region {} that is not supported",
                guid.to_braced()
            )));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return corrupt(format!("region {} appears twice", guid.to_braced()));
        }
    }
    match (bat, meta) {
        (Some(bat), Some(meta)) => Ok((bat, meta)),
        _ => corrupt("the region table lacks the BAT or the metadata region".into()),
    }
}

/// A region is 1 MiB aligned, past the first MiB, inside the file, overlaps none of `seen`.
fn check_region(r: Region, file_len: u64, seen: &[Region]) -> Result<()> {
    let end = r.offset.checked_add(r.length);
    if !r.offset.is_multiple_of(MIB) || r.offset < MIB || end.is_none_or(|e| e > file_len) {
        return corrupt(format!(
            "region at {:#x} ({} bytes) is misplaced or beyond the end of the file ({file_len} \
             bytes)",
            r.offset, r.length
        ));
    }
    if let Some(o) = seen.iter().find(|o| {
        // `o` may be the header's log region, whose bounds are checked only when its GUID
        // says a log is in use: saturate rather than trust them.
        r.offset < o.offset.saturating_add(o.length) && o.offset < r.offset.saturating_add(r.length)
    }) {
        return corrupt(format!(
            "region at {:#x} overlaps the one at {:#x}",
            r.offset, o.offset
        ));
    }
    Ok(())
}

/// The metadata items the driver uses, decoded and validated. QEMU: `vhdx_parse_metadata()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    /// Blocks stay allocated (a fixed image); informative only.
    pub leave_blocks_allocated: bool,
    /// A differencing image.
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    /// The parent locator item's bytes (differencing images).
    pub parent_locator: Option<Vec<u8>>,
}

impl Metadata {
    /// Parses the metadata region `region` (its bytes, as much as the file holds).
    pub fn parse(region: &[u8]) -> Result<Metadata> {
        if region.len() < TABLE_SIZE || &region[..8] != b"metadata" {
            return corrupt("bad metadata table signature".into());
        }
        let count = usize::from(le16(region, 10));
        if 32 + count * 32 > TABLE_SIZE {
            return corrupt(format!("{count} metadata entries do not fit in the table"));
        }
        let mut items: Vec<(Guid, &[u8])> = Vec::new();
        for i in 0..count {
            let e = 32 + i * 32;
            let id = Guid::read(region, e);
            let (off, len) = (le32(region, e + 16) as usize, le32(region, e + 20) as usize);
            let required = le32(region, e + 24) & 4 != 0;
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE_83,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ];
            if !known.contains(&id) {
                if required {
                    return Err(BlockError::Invalid(format!(
                        "vhdx: the image needs metadata item {} that is not supported",
                        id.to_braced()
                    )));
                }
                continue;
            }
            if items.iter().any(|(g, _)| *g == id) {
                return corrupt(format!("metadata item {} appears twice", id.to_braced()));
            }
            let Some(bytes) = off.checked_add(len).and_then(|end| region.get(off..end)) else {
                return corrupt(format!(
                    "metadata item {} ({len} bytes at {off:#x}) lies outside its region",
                    id.to_braced()
                ));
            };
            items.push((id, bytes));
        }
        let item = |id: Guid, min: usize, what: &str| -> Result<&[u8]> {
            match items.iter().find(|(g, _)| *g == id) {
                Some((_, b)) if b.len() >= min => Ok(b),
                Some(_) => corrupt(format!("the {what} metadata item is too short")),
                None => corrupt(format!("the {what} metadata item is missing")),
            }
        };
        let params = item(FILE_PARAMETERS, 8, "file parameters")?;
        let size = item(VIRTUAL_DISK_SIZE, 8, "virtual disk size")?;
        let lss = item(LOGICAL_SECTOR_SIZE, 4, "logical sector size")?;
        item(PAGE_83, 0, "page 83 data")?;
        item(PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?;
        let m = Metadata {
            block_size: le32(params, 0),
            leave_blocks_allocated: le32(params, 4) & 1 != 0,
            has_parent: le32(params, 4) & 2 != 0,
            virtual_size: le64(size, 0),
            logical_sector_size: le32(lss, 0),
            parent_locator: items
                .iter()
                .find(|(g, _)| *g == PARENT_LOCATOR)
                .map(|(_, b)| b.to_vec()),
        };
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&bs) {
            return corrupt(format!("invalid block size {bs}"));
        }
        if self.logical_sector_size != 512 && self.logical_sector_size != 4096 {
            return corrupt(format!(
                "invalid logical sector size {}",
                self.logical_sector_size
            ));
        }
        if self.virtual_size == 0
            || self.virtual_size > MAX_DISK_SIZE
            || !self
                .virtual_size
                .is_multiple_of(u64::from(self.logical_sector_size))
        {
            return corrupt(format!("invalid virtual disk size {}", self.virtual_size));
        }
        if self.has_parent && self.parent_locator.is_none() {
            return corrupt("a differencing image without a parent locator".into());
        }
        Ok(())
    }

    /// Payload blocks per sector bitmap block. QEMU: `chunk_ratio`.
    pub fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.logical_sector_size) / u64::from(self.block_size)
    }

    /// The number of payload blocks.
    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }

    /// The number of BAT entries, sector bitmap entries included. QEMU:
    /// `vhdx_calc_bat_entries()`.
    pub fn bat_entries(&self) -> u64 {
        let cr = self.chunk_ratio();
        let data = self.data_blocks();
        if self.has_parent {
            data.div_ceil(cr) * (cr + 1)
        } else {
            data + (data - 1) / cr
        }
    }
}

/// The key/value pairs of a parent locator item (UTF-16LE strings). QEMU has no counterpart
/// (it refuses differencing images); the layout is the spec's.
pub fn parse_parent_locator(b: &[u8]) -> Result<Vec<(String, String)>> {
    if b.len() < 20 {
        return corrupt("the parent locator is too short".into());
    }
    if Guid::read(b, 0) != PARENT_TYPE_VHDX {
        return Err(BlockError::Invalid(format!(
            "vhdx: parent locator type {} is not supported (only vhdx parents)",
            Guid::read(b, 0).to_braced()
        )));
    }
    let count = usize::from(le16(b, 18));
    let mut pairs = Vec::with_capacity(count.min(64));
    for i in 0..count {
        let e = 20 + i * 12;
        let Some(entry) = b.get(e..e + 12) else {
            return corrupt("the parent locator's entries run past its end".into());
        };
        let string = |off: u32, len: u16| -> Result<String> {
            let (off, len) = (off as usize, usize::from(len));
            match off.checked_add(len).and_then(|end| b.get(off..end)) {
                Some(s) if len % 2 == 0 => {
                    let units: Vec<u16> = s
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16(&units)
                        .or_else(|_| corrupt("a parent locator string is not UTF-16".into()))
                }
                _ => corrupt("a parent locator string lies outside the locator".into()),
            }
        };
        let key = string(le32(entry, 0), le16(entry, 8))?;
        let value = string(le32(entry, 4), le16(entry, 10))?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Whether the log region `log` (its bytes) holds an entry of `log_guid` that would have to be
/// replayed before the image can be read consistently: a 4 KiB sector starting with a valid
/// entry header (signature `loge`, this log GUID, a non-zero sequence number, a length in
/// whole sectors that fits in the log). A header whose log GUID is zero has an empty log.
/// QEMU: `vhdx_parse_log()` → `vhdx_log_search()`, `vhdx_log_hdr_is_valid()`.
pub fn log_needs_replay(log_guid: Guid, log: &[u8]) -> bool {
    if log_guid.is_zero() {
        return false;
    }
    log.chunks_exact(LOG_SECTOR as usize).any(|s| {
        let entry_length = u64::from(le32(s, 8));
        &s[..4] == b"loge"
            && Guid::read(s, 32) == log_guid
            && le64(s, 16) != 0
            && entry_length > 0
            && entry_length % LOG_SECTOR == 0
            && entry_length <= log.len() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchecked_log_region_at_the_end_of_the_address_space_is_no_overflow() {
        // The header's log region is not bounds-checked when its GUID is zero; a region
        // compared with it must not overflow (a panic in debug and fuzz builds).
        let log = Region {
            offset: u64::MAX - 10,
            length: u64::from(u32::MAX),
        };
        let bat = Region {
            offset: MIB,
            length: MIB,
        };
        assert!(check_region(bat, 4 * MIB, &[log]).is_ok());
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720, B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text() {
        assert_eq!(
            PARENT_TYPE_VHDX.to_braced(),
            "{B04AEFB7-D19E-4A81-B789-25B8E9445913}"
        );
    }

    #[test]
    fn header_choice() {
        let make = |seq: u64| {
            let mut b = vec![0u8; HEADER_SIZE];
            b[..4].copy_from_slice(b"head");
            b[8..16].copy_from_slice(&seq.to_le_bytes());
            b[66..68].copy_from_slice(&1u16.to_le_bytes());
            let c = crc32c(&b);
            b[4..8].copy_from_slice(&c.to_le_bytes());
            b
        };
        let (a, b) = (make(5), make(7));
        assert_eq!(Header::current(&a, &b).unwrap().sequence_number, 7);
        assert_eq!(Header::current(&b, &a).unwrap().sequence_number, 7);
        let mut bad = b.clone();
        bad[100] = 1;
        assert_eq!(
            Header::current(&a, &bad).unwrap().sequence_number,
            5,
            "bad crc"
        );
        assert!(Header::current(&bad, &bad).is_err());
        assert!(Header::current(&a, &a).is_ok(), "identical twins");
    }

    #[test]
    fn bat_entries() {
        let m = |size: u64, bs: u32, parent: bool| Metadata {
            block_size: bs,
            leave_blocks_allocated: false,
            has_parent: parent,
            virtual_size: size,
            logical_sector_size: 512,
            parent_locator: None,
        };
        assert_eq!(m(64 * MIB, 32 << 20, false).chunk_ratio(), 128);
        assert_eq!(m(64 * MIB, 32 << 20, false).bat_entries(), 2);
        assert_eq!(m(64 * MIB, 32 << 20, true).bat_entries(), 129);
        // 130 blocks: two chunks, one interleaved bitmap entry.
        assert_eq!(m(130 * (32 << 20), 32 << 20, false).bat_entries(), 131);
    }
}
