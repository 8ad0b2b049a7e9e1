//! Partition tables: reading MBR and GPT tables into byte windows (`offset`, `size`) of a disk.
//!
//! Models: Linux `block/partitions/msdos.c` and `efi.c` (the numbering: MBR primaries 1–4 by
//! slot, logicals 5, 6, … in EBR-chain order; GPT entry index + 1, empty entries skipped but
//! counted), nbdkit's partition filter, and QEMU's removed `qemu-nbd --partition`.
//!
//! Rules: the input is untrusted. Nothing here panics on input bytes or uses `unsafe`. The
//! sector size is 512 bytes. A sector 0 with 0x55AA whose boot indicators are not 0x00/0x80 is
//! a boot sector (FAT, NTFS), not a table. Every partition must have size > 0, lie inside the disk and
//! overlap no other; any violation is a [`TableError`] (the caller warns and shows no
//! partitions, never a wrong window). The extended MBR partition is not listed. Only the
//! primary GPT header (LBA 1) is read; the backup at the last LBA is not tried.
//! CRC32 is a local table-driven one (no new dependency for 20 lines).

use std::fmt;
use std::io;

/// Sector size assumed for both table formats.
pub const SECTOR: u64 = 512;
const MAX_LOGICALS: usize = 128;
const MAX_GPT_ARRAY: u64 = 1 << 20;

/// What kind of entry a partition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Mbr { type_byte: u8 },
    Gpt { type_guid: [u8; 16], name: String },
}

/// One partition: a byte window of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
}

/// Why a partition table was refused.
#[derive(Debug)]
pub enum TableError {
    Io(io::Error),
    GptMissing,
    GptHeaderSize(u32),
    GptHeaderCrc,
    GptEntrySize(u32),
    GptArrayTooLarge(u64),
    GptArrayOutside,
    GptEntriesCrc,
    Inverted {
        number: u32,
        first: u64,
        last: u64,
    },
    Empty(u32),
    PastEnd {
        number: u32,
        end: u64,
        disk_size: u64,
    },
    Overlap(u32, u32),
    MultipleExtended,
    ExtendedLoop,
    TooManyLogicals,
    EbrOutside(u64),
    EbrNoSignature(u64),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Io(e) => write!(f, "reading the partition table: {e}"),
            TableError::GptMissing => write!(f, "protective MBR but no GPT header at LBA 1"),
            TableError::GptHeaderSize(s) => write!(f, "GPT header size {s} is not in 92..=512"),
            TableError::GptHeaderCrc => write!(f, "GPT header CRC mismatch"),
            TableError::GptEntrySize(s) => {
                write!(f, "GPT entry size {s} is not a multiple of 8 of at least 128")
            }
            TableError::GptArrayTooLarge(n) => {
                write!(f, "GPT entry array of {n} bytes is larger than 1 MiB")
            }
            TableError::GptArrayOutside => write!(f, "GPT entry array lies past the end of the disk"),
            TableError::GptEntriesCrc => write!(f, "GPT entry array CRC mismatch"),
            TableError::Inverted { number, first, last } => write!(
                f,
                "partition {number} ends before it starts (first LBA {first}, last LBA {last})"
            ),
            TableError::Empty(n) => write!(f, "partition {n} has size 0"),
            TableError::PastEnd { number, end, disk_size } => write!(
                f,
                "partition {number} ends past the end of the disk (ends at byte {end}, disk is {disk_size} bytes)"
            ),
            TableError::Overlap(a, b) => write!(f, "partitions {a} and {b} overlap"),
            TableError::MultipleExtended => write!(f, "more than one extended partition"),
            TableError::ExtendedLoop => write!(f, "extended partition chain loops"),
            TableError::TooManyLogicals => {
                write!(f, "more than {MAX_LOGICALS} logical partitions")
            }
            TableError::EbrOutside(s) => {
                write!(f, "EBR at sector {s} lies outside the extended partition")
            }
            TableError::EbrNoSignature(s) => {
                write!(f, "EBR at sector {s} has no 0x55AA signature")
            }
        }
    }
}

impl std::error::Error for TableError {}

impl From<io::Error> for TableError {
    fn from(e: io::Error) -> Self {
        TableError::Io(e)
    }
}

/// CRC32 (IEEE, reflected polynomial 0xEDB88320), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
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
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

type Read<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>;

fn read_sector(read: Read, lba: u64) -> Result<[u8; 512], TableError> {
    let mut buf = [0u8; 512];
    let off = lba.checked_mul(SECTOR).ok_or(TableError::ExtendedLoop)?;
    read(off, &mut buf)?;
    Ok(buf)
}

fn has_signature(s: &[u8; 512]) -> bool {
    s[510] == 0x55 && s[511] == 0xAA
}

/// One raw MBR entry: (type, LBA start, sectors).
fn mbr_entry(s: &[u8; 512], slot: usize) -> (u8, u64, u64) {
    let at = 0x1BE + 16 * slot;
    let ty = s.get(at + 4).copied().unwrap_or(0);
    (ty, u64::from(le32(s, at + 8)), u64::from(le32(s, at + 12)))
}

fn is_extended(ty: u8) -> bool {
    matches!(ty, 0x05 | 0x0F | 0x85)
}

fn window(
    number: u32,
    start_lba: u64,
    sectors: u64,
    disk_size: u64,
) -> Result<(u64, u64), TableError> {
    if sectors == 0 {
        return Err(TableError::Empty(number));
    }
    let past = |end| TableError::PastEnd {
        number,
        end,
        disk_size,
    };
    let offset = start_lba.checked_mul(SECTOR).ok_or(past(u64::MAX))?;
    let size = sectors.checked_mul(SECTOR).ok_or(past(u64::MAX))?;
    let end = offset.checked_add(size).ok_or(past(u64::MAX))?;
    if end > disk_size {
        return Err(past(end));
    }
    Ok((offset, size))
}

/// Reads the partition table of a disk of `disk_size` bytes through `read(offset, buf)`.
/// `Ok(None)`: no partition table (no 0x55AA signature in sector 0).
pub fn read_partitions(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    disk_size: u64,
) -> Result<Option<Table>, TableError> {
    if disk_size < SECTOR {
        return Ok(None);
    }
    let mbr = read_sector(read, 0)?;
    if !has_signature(&mbr) {
        return Ok(None);
    }
    // Linux msdos_partition(): a boot indicator other than 0x00/0x80 means this sector is not
    // a partition table but a boot sector with 0x55AA (a FAT or NTFS file system without one).
    if (0..4).any(|slot| !matches!(mbr[0x1BE + 16 * slot], 0x00 | 0x80)) {
        return Ok(None);
    }
    // Linux is_pmbr_valid(): a 0xEE entry in any slot means GPT.
    let table = if (0..4).any(|i| mbr_entry(&mbr, i).0 == 0xEE) {
        Table {
            kind: TableKind::Gpt,
            partitions: read_gpt(read, disk_size)?,
        }
    } else {
        Table {
            kind: TableKind::Mbr,
            partitions: read_mbr(read, &mbr, disk_size)?,
        }
    };
    check_overlap(&table.partitions)?;
    Ok(Some(table))
}

fn read_mbr(read: Read, mbr: &[u8; 512], disk_size: u64) -> Result<Vec<Partition>, TableError> {
    let mut parts = Vec::new();
    let mut extended = None;
    for slot in 0..4 {
        let (ty, start, sectors) = mbr_entry(mbr, slot);
        let number = slot as u32 + 1;
        if ty == 0 {
            continue;
        }
        let (offset, size) = window(number, start, sectors, disk_size)?;
        if is_extended(ty) {
            if extended.is_some() {
                return Err(TableError::MultipleExtended);
            }
            extended = Some((start, sectors));
            continue;
        }
        parts.push(Partition {
            number,
            offset,
            size,
            kind: Kind::Mbr { type_byte: ty },
        });
    }
    if let Some((ext_start, ext_sectors)) = extended {
        let ext_end = ext_start + ext_sectors; // no overflow: checked by window()
        let mut visited = std::collections::HashSet::new();
        let mut ebr = ext_start;
        let mut number = 5u32;
        loop {
            if !visited.insert(ebr) {
                return Err(TableError::ExtendedLoop);
            }
            if visited.len() > MAX_LOGICALS {
                return Err(TableError::TooManyLogicals);
            }
            let s = read_sector(read, ebr)?;
            if !has_signature(&s) {
                return Err(TableError::EbrNoSignature(ebr));
            }
            let (ty, start, sectors) = mbr_entry(&s, 0);
            if ty != 0 && !is_extended(ty) {
                let lba = ebr.checked_add(start).ok_or(TableError::EbrOutside(ebr))?;
                let (offset, size) = window(number, lba, sectors, disk_size)?;
                if lba < ext_start || lba + sectors > ext_end {
                    return Err(TableError::EbrOutside(ebr));
                }
                parts.push(Partition {
                    number,
                    offset,
                    size,
                    kind: Kind::Mbr { type_byte: ty },
                });
                number += 1;
            }
            let (nty, nstart, _) = mbr_entry(&s, 1);
            if !is_extended(nty) {
                break;
            }
            let next = ext_start
                .checked_add(nstart)
                .ok_or(TableError::EbrOutside(u64::MAX))?;
            if next >= ext_end {
                return Err(TableError::EbrOutside(next));
            }
            ebr = next;
        }
    }
    Ok(parts)
}

fn read_gpt(read: Read, disk_size: u64) -> Result<Vec<Partition>, TableError> {
    if disk_size < 2 * SECTOR {
        return Err(TableError::GptMissing);
    }
    let mut h = read_sector(read, 1)?;
    if &h[..8] != b"EFI PART" {
        return Err(TableError::GptMissing);
    }
    let hsize = le32(&h, 12);
    if !(92..=512).contains(&hsize) {
        return Err(TableError::GptHeaderSize(hsize));
    }
    let crc = le32(&h, 16);
    h[16..20].fill(0);
    if crc32(h.get(..hsize as usize).unwrap_or(&[])) != crc {
        return Err(TableError::GptHeaderCrc);
    }
    let entry_lba = le64(&h, 72);
    let num = le32(&h, 80);
    let esize = le32(&h, 84);
    if esize < 128 || !esize.is_multiple_of(8) {
        return Err(TableError::GptEntrySize(esize));
    }
    let bytes = u64::from(num) * u64::from(esize);
    if bytes > MAX_GPT_ARRAY {
        return Err(TableError::GptArrayTooLarge(bytes));
    }
    let off = entry_lba
        .checked_mul(SECTOR)
        .ok_or(TableError::GptArrayOutside)?;
    if off.checked_add(bytes).is_none_or(|end| end > disk_size) {
        return Err(TableError::GptArrayOutside);
    }
    let mut array = vec![0u8; bytes as usize];
    read(off, &mut array)?;
    if crc32(&array) != le32(&h, 88) {
        return Err(TableError::GptEntriesCrc);
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(esize as usize).enumerate() {
        let type_guid: [u8; 16] = match e.get(..16).and_then(|s| s.try_into().ok()) {
            Some(g) => g,
            None => continue,
        };
        if type_guid == [0; 16] {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return Err(TableError::Inverted {
                number,
                first,
                last,
            });
        }
        let sectors = (last - first).checked_add(1).ok_or(TableError::PastEnd {
            number,
            end: u64::MAX,
            disk_size,
        })?;
        let (offset, size) = window(number, first, sectors, disk_size)?;
        let units: Vec<u16> = e
            .get(56..128)
            .unwrap_or(&[])
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        parts.push(Partition {
            number,
            offset,
            size,
            kind: Kind::Gpt { type_guid, name },
        });
    }
    Ok(parts)
}

fn check_overlap(parts: &[Partition]) -> Result<(), TableError> {
    let mut sorted: Vec<&Partition> = parts.iter().collect();
    sorted.sort_by_key(|p| p.offset);
    for w in sorted.windows(2) {
        if let [a, b] = w {
            if a.offset + a.size > b.offset {
                let (x, y) = (a.number.min(b.number), a.number.max(b.number));
                return Err(TableError::Overlap(x, y));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn entry(disk: &mut [u8], sector: u64, slot: usize, ty: u8, start: u32, sectors: u32) {
        let at = (sector * SECTOR) as usize + 0x1BE + 16 * slot;
        disk[at + 4] = ty;
        disk[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        disk[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
        let s = (sector * SECTOR) as usize;
        disk[s + 510] = 0x55;
        disk[s + 511] = 0xAA;
    }

    fn parse(disk: &[u8]) -> Result<Option<Table>, TableError> {
        let mut read = |off: u64, buf: &mut [u8]| -> io::Result<()> {
            let s = disk
                .get(off as usize..off as usize + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(s);
            Ok(())
        };
        read_partitions(&mut read, disk.len() as u64)
    }

    fn windows(t: &Table) -> Vec<(u32, u64, u64)> {
        t.partitions
            .iter()
            .map(|p| (p.number, p.offset / SECTOR, p.size / SECTOR))
            .collect()
    }

    #[test]
    fn crc32_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn no_signature() {
        assert!(parse(&vec![0u8; 4096]).unwrap().is_none());
    }

    /// A FAT boot sector has 0x55AA too; its "boot indicators" are code, not 0x00/0x80: no
    /// table, as Linux decides (not a damaged one, which would warn).
    #[test]
    fn boot_sector_is_not_a_table() {
        let mut d = vec![0u8; 8 * MIB as usize];
        entry(&mut d, 0, 0, 0x83, 2048, 4096);
        assert!(parse(&d).unwrap().is_some());
        d[0x1BE + 16] = 0x12;
        assert!(parse(&d).unwrap().is_none());
        d[0x1BE + 16] = 0x80;
        assert!(parse(&d).unwrap().is_some());
    }

    #[test]
    fn mbr_primaries() {
        let mut d = vec![0u8; 8 * MIB as usize];
        entry(&mut d, 0, 0, 0x83, 2048, 4096);
        entry(&mut d, 0, 2, 0x07, 8192, 2048);
        let t = parse(&d).unwrap().unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        assert_eq!(windows(&t), [(1, 2048, 4096), (3, 8192, 2048)]);
    }

    fn extended_disk() -> Vec<u8> {
        let mut d = vec![0u8; 16 * MIB as usize];
        entry(&mut d, 0, 0, 0x83, 2048, 2048);
        entry(&mut d, 0, 1, 0x05, 8192, 16384);
        entry(&mut d, 8192, 0, 0x83, 2048, 4096); // logical 5 at 10240
        entry(&mut d, 8192, 1, 0x05, 8192, 8192); // next EBR at 16384
        entry(&mut d, 16384, 0, 0x83, 2048, 2048); // logical 6 at 18432
        d
    }

    #[test]
    fn mbr_extended_two_logicals() {
        let t = parse(&extended_disk()).unwrap().unwrap();
        assert_eq!(
            windows(&t),
            [(1, 2048, 2048), (5, 10240, 4096), (6, 18432, 2048)]
        );
    }

    #[test]
    fn mbr_errors() {
        let mut d = extended_disk();
        entry(&mut d, 16384, 1, 0x05, 0, 1); // back to the first EBR
        assert!(
            matches!(parse(&d), Err(TableError::ExtendedLoop)),
            "{:?}",
            parse(&d)
        );
        let mut d = extended_disk();
        entry(&mut d, 16384, 1, 0x05, 16384, 1);
        assert!(matches!(parse(&d), Err(TableError::EbrOutside(_))));
        let mut d = extended_disk();
        entry(&mut d, 0, 2, 0x83, 2048, 1);
        let e = parse(&d).unwrap_err();
        assert_eq!(e.to_string(), "partitions 1 and 3 overlap");
        let mut d = extended_disk();
        entry(&mut d, 0, 2, 0x83, 32000, 2000);
        let e = parse(&d).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("partition 3 ends past the end of the disk"),
            "{e}"
        );
        let mut d = extended_disk();
        entry(&mut d, 0, 2, 0x83, 30000, 0);
        assert!(matches!(parse(&d), Err(TableError::Empty(3))));
        let mut d = extended_disk();
        entry(&mut d, 0, 2, 0x0F, 30000, 10);
        assert!(matches!(parse(&d), Err(TableError::MultipleExtended)));
        // 130 chained EBRs, one sector apart, each with a 1-sector logical.
        let mut d = vec![0u8; 4 * MIB as usize];
        entry(&mut d, 0, 0, 0x05, 2048, 4000);
        for i in 0..130u32 {
            let ebr = 2048 + 2 * u64::from(i);
            entry(&mut d, ebr, 0, 0x83, 1, 1);
            entry(&mut d, ebr, 1, 0x05, 2 * (i + 1), 2);
        }
        let e = parse(&d).unwrap_err();
        assert_eq!(e.to_string(), "more than 128 logical partitions");
    }

    /// GPT with 3 partitions (entries 1, 2 and 4; entry 3 empty) and a gap.
    fn gpt_disk() -> Vec<u8> {
        let mut d = vec![0u8; 8 * MIB as usize];
        let n = (d.len() as u64 / SECTOR - 1) as u32;
        entry(&mut d, 0, 0, 0xEE, 1, n);
        let mut array = vec![0u8; 128 * 128];
        for (i, first, last, name) in [
            (0usize, 2048u64, 4095u64, "one"),
            (1, 4096, 6143, "two"),
            (3, 8192, 10239, "four"),
        ] {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0] = 0xAF;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        d[1024..1024 + array.len()].copy_from_slice(&array);
        let h = &mut d[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
        reseal(&mut d);
        d
    }

    fn reseal(d: &mut [u8]) {
        d[528..532].fill(0);
        let c = crc32(&d[512..604]);
        d[528..532].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn gpt_three_with_gap() {
        let t = parse(&gpt_disk()).unwrap().unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(
            windows(&t),
            [(1, 2048, 2048), (2, 4096, 2048), (4, 8192, 2048)]
        );
        assert!(matches!(&t.partitions[2].kind, Kind::Gpt { name, .. } if name == "four"));
    }

    #[test]
    fn gpt_errors() {
        let mut d = gpt_disk();
        d[512 + 40] ^= 1;
        assert_eq!(
            parse(&d).unwrap_err().to_string(),
            "GPT header CRC mismatch"
        );
        let mut d = gpt_disk();
        d[1024 + 32] ^= 1;
        assert_eq!(
            parse(&d).unwrap_err().to_string(),
            "GPT entry array CRC mismatch"
        );
        let mut d = gpt_disk();
        d[512..520].copy_from_slice(b"NOT PART");
        assert!(matches!(parse(&d), Err(TableError::GptMissing)));
        let mut d = gpt_disk();
        d[524..528].copy_from_slice(&91u32.to_le_bytes());
        assert!(matches!(parse(&d), Err(TableError::GptHeaderSize(91))));
        let mut d = gpt_disk();
        d[596..600].copy_from_slice(&64u32.to_le_bytes());
        reseal(&mut d);
        assert!(matches!(parse(&d), Err(TableError::GptEntrySize(64))));
        let mut d = gpt_disk();
        d[592..596].copy_from_slice(&100_000u32.to_le_bytes());
        reseal(&mut d);
        assert!(matches!(parse(&d), Err(TableError::GptArrayTooLarge(_))));
        // Entry 2 overlapping entry 1, past the end, inverted: patch and re-CRC the array.
        for (first, last, want) in [
            (3000u64, 6143u64, "partitions 1 and 2 overlap"),
            (4096, 1 << 40, "partition 2 ends past the end of the disk"),
            (4096, 10, "partition 2 ends before it starts"),
        ] {
            let mut d = gpt_disk();
            d[1024 + 128 + 32..1024 + 128 + 40].copy_from_slice(&first.to_le_bytes());
            d[1024 + 128 + 40..1024 + 128 + 48].copy_from_slice(&last.to_le_bytes());
            let c = crc32(&d[1024..1024 + 128 * 128]);
            d[600..604].copy_from_slice(&c.to_le_bytes());
            reseal(&mut d);
            let e = parse(&d).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }
}
