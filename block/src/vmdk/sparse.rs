//! A hosted sparse extent (`KDMV`): guest offset → grain directory → grain table → grain.
//!
//! QEMU: `vmdk_open_vmdk4()`, `vmdk_init_tables()`, `get_cluster_offset()`,
//! `vmdk_read_extent()` and `vmdk_co_block_status()` in `block/vmdk.c`.
//!
//! The extent's guest bytes are cut into *grains* (64 KiB in every image `qemu-img` makes). A
//! *grain table* (GT) maps `gtes_per_gt` consecutive grains (512: 32 MiB of guest data) to
//! sector offsets in the file; the *grain directory* (GD) maps each GT's range to the sector
//! where that table is. Both are little-endian `u32` sector numbers:
//!
//! ```text
//!   guest offset ─┬─ / gt_span ──────────────> GD[i] = sector of a GT (0: none → unallocated)
//!                 └─ / grain_size % gtes ────> GT[j] = sector of the grain
//!                                               0: unallocated   1 (with FLAG_ZERO_GRAIN): zeros
//! ```
//!
//! Reads split lookup from I/O (as `qcow2/`): [`SparseExtent::co_lookup`] turns an offset into
//! a [`Grain`], under nothing but a short `std::sync::Mutex` around the GT cache (never held
//! across a yield: a table missing from the cache is read without it, then inserted — two
//! readers may read the same table, which is harmless for a read-only image).
//!
//! In a stream-optimized extent every grain is a zlib stream, which a *grain marker* (the guest
//! LBA and the compressed length) precedes when [`FLAG_MARKERS`](super::header::FLAG_MARKERS)
//! is set; a GT entry points at the marker. A read inflates the whole grain and keeps the last
//! one, so that sequential reads smaller than a grain inflate it once (QEMU inflates the whole
//! grain for every read); a grain over 1 MiB is inflated only up to the requested bytes.
//!
//! Every offset from the file is checked before it is used: a GT or grain starting past the
//! end of the file, or a compressed grain that does not inflate, fails that read with
//! [`BlockError::Corrupt`] (EIO) and a log line; the image keeps being served. A grain whose
//! *tail* lies past the end reads zeros there, as QEMU's file driver pads short reads.

use std::sync::{Arc, Mutex};

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::header::{self, Geometry, SparseHeader, GRAIN_MARKER_LEN, SECTOR};
use super::ExtentFile;
use crate::{BlockError, BlockStatus, Result};

/// Grain tables kept per extent (QEMU: `L2_CACHE_SIZE`).
const GT_CACHE_TABLES: usize = 16;
/// Compressed grains up to this size are inflated whole and the last one kept (every grain
/// `qemu-img` and VMware make is 64 KiB).
const MAX_CACHED_GRAIN: u64 = 1 << 20;

/// Where the bytes of one grain are. QEMU: `VMDK_UNALLOC`, `VMDK_ZEROED`, `VMDK_OK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Never written: zeros (a delta disk would read its parent; we refuse those).
    Unallocated,
    /// Written as zeros (a GT entry of 1 with the zeroed-grain flag).
    Zeroed,
    /// Stored as is at this byte offset of the file.
    Data(u64),
    /// Stored as a zlib stream (after a grain marker, if the extent has them) at this offset.
    Compressed(u64),
}

impl Grain {
    fn status(self) -> BlockStatus {
        match self {
            Grain::Data(_) | Grain::Compressed(_) => BlockStatus::Data,
            Grain::Zeroed | Grain::Unallocated => BlockStatus::Zero,
        }
    }
}

/// An LRU of grain tables, keyed by their sector; the most recently used last.
struct GtCache {
    tables: Vec<(u32, Arc<[u32]>)>,
}

/// An open sparse extent.
pub(super) struct SparseExtent {
    file: Arc<ExtentFile>,
    geo: Geometry,
    /// The grain directory, decoded.
    gd: Vec<u32>,
    gts: Mutex<GtCache>,
    /// The last compressed grain inflated whole: its file offset and bytes.
    inflated: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl SparseExtent {
    /// Reads and checks the header (or, for [`header::GD_AT_END`], the footer) and the grain
    /// directory. QEMU: `vmdk_open_vmdk4()` + `vmdk_init_tables()`.
    pub(super) fn open(file: Arc<ExtentFile>) -> Result<SparseExtent> {
        let mut sector = vec![0u8; SECTOR as usize];
        file.co_read(0, &mut sector)?;
        let mut h = SparseHeader::parse(&sector)?;
        if h.capacity == 0 && h.desc_offset != 0 {
            // QEMU then opens the embedded descriptor's extents instead; no tool makes these.
            return Err(BlockError::Invalid(
                "vmdk: a sparse extent of capacity 0 that defers to its descriptor is not \
                 supported"
                    .into(),
            ));
        }
        if h.gd_offset == header::GD_AT_END {
            let len = file.len();
            if len < header::FOOTER_LEN + SECTOR {
                return Err(BlockError::Corrupt(
                    "vmdk: the grain directory is in the footer, but the file is too short \
                     for one"
                        .into(),
                ));
            }
            let mut footer = vec![0u8; header::FOOTER_LEN as usize];
            file.co_read(len - header::FOOTER_LEN, &mut footer)?;
            h = SparseHeader::parse_footer(&footer)?;
        }
        if h.newlines_mangled() {
            log::warn!(
                "vmdk: '{}': the newline-detection bytes are wrong: the file may have been \
                 damaged by a text-mode transfer",
                file.name()
            );
        }
        let geo = h.geometry(file.len())?;
        let mut raw = vec![0u8; geo.gd_entries as usize * 4];
        file.co_read(geo.gd_offset, &mut raw)?;
        Ok(SparseExtent {
            file,
            geo,
            gd: decode(&raw),
            gts: Mutex::new(GtCache { tables: Vec::new() }),
            inflated: Mutex::new(None),
        })
    }

    /// The virtual size of the extent, in bytes.
    pub(super) fn capacity(&self) -> u64 {
        self.geo.capacity
    }

    /// Whether grains are compressed (a stream-optimized extent).
    pub(super) fn is_compressed(&self) -> bool {
        self.geo.compressed
    }

    /// The grain table at sector `gt_sector`, from the cache or the file.
    fn co_grain_table(&self, gt_sector: u32) -> Result<Arc<[u32]>> {
        {
            let mut c = self.gts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = c.tables.iter().rposition(|(s, _)| *s == gt_sector) {
                let entry = c.tables.remove(i);
                let table = entry.1.clone();
                c.tables.push(entry);
                return Ok(table);
            }
        }
        let offset = u64::from(gt_sector) * SECTOR;
        let bytes = u64::from(self.geo.gtes_per_gt) * 4;
        if offset.saturating_add(bytes) > self.file.len() {
            return Err(self.file.corrupt(format!(
                "grain table at {offset:#x} is beyond the end of the file ({} bytes)",
                self.file.len()
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file.co_read(offset, &mut raw)?;
        let table: Arc<[u32]> = decode(&raw).into();
        let mut c = self.gts.lock().unwrap_or_else(|p| p.into_inner());
        // Another reader may have loaded it meanwhile: keep one copy.
        if !c.tables.iter().any(|(s, _)| *s == gt_sector) {
            if c.tables.len() >= GT_CACHE_TABLES {
                c.tables.remove(0);
            }
            c.tables.push((gt_sector, table.clone()));
        }
        Ok(table)
    }

    /// Where the grain holding extent offset `pos` (< capacity) is. QEMU:
    /// `get_cluster_offset()` without allocation.
    pub(super) fn co_lookup(&self, pos: u64) -> Result<Grain> {
        let grain = pos / self.geo.grain_size;
        let gtes = u64::from(self.geo.gtes_per_gt);
        let Some(&gt_sector) = self.gd.get((grain / gtes) as usize) else {
            return Err(self
                .file
                .corrupt(format!("offset {pos} is beyond the grain directory")));
        };
        if gt_sector == 0 {
            return Ok(Grain::Unallocated);
        }
        let table = self.co_grain_table(gt_sector)?;
        let entry = table[(grain % gtes) as usize];
        match entry {
            0 => Ok(Grain::Unallocated),
            1 if self.geo.zero_grain => Ok(Grain::Zeroed),
            sector => {
                let host = u64::from(sector) * SECTOR;
                if host >= self.file.len() {
                    return Err(self.file.corrupt(format!(
                        "grain table entry for offset {pos} points at {host:#x}, beyond the end \
                         of the file ({} bytes)",
                        self.file.len()
                    )));
                }
                Ok(if self.geo.compressed {
                    Grain::Compressed(host)
                } else {
                    Grain::Data(host)
                })
            }
        }
    }

    /// Reads extent bytes `[pos, pos + buf.len())`, inside the extent: grain by grain, with
    /// runs of grains that follow each other in the file read at once.
    pub(super) fn co_read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let gs = self.geo.grain_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let grain = self.co_lookup(at)?;
            let mut n = (gs - at % gs).min((buf.len() - done) as u64);
            if let Grain::Data(host) = grain {
                while done as u64 + n < buf.len() as u64 {
                    let next = at + n;
                    let want = Grain::Data(host + at % gs + n);
                    if self.co_lookup(next).ok() != Some(want) {
                        break;
                    }
                    n = (n + gs).min((buf.len() - done) as u64);
                }
            }
            let out = &mut buf[done..done + n as usize];
            match grain {
                Grain::Unallocated | Grain::Zeroed => out.fill(0),
                Grain::Data(host) => self.file.co_read(host + at % gs, out)?,
                Grain::Compressed(host) => self.co_read_compressed(host, at % gs, out)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from `skip` on of the grain stored compressed at `host`: from
    /// the last grain inflated if it is that one, else inflated now — the whole grain, kept
    /// for the next read (sequential reads smaller than a grain inflate it once), or for
    /// grains over [`MAX_CACHED_GRAIN`] only up to the end of `buf`. QEMU: the compressed
    /// branch of `vmdk_read_extent()`, which inflates the whole grain for every read.
    fn co_read_compressed(&self, host: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
        let cached = {
            let last = self.inflated.lock().unwrap_or_else(|p| p.into_inner());
            last.as_ref()
                .filter(|(at, _)| *at == host)
                .map(|(_, g)| g.clone())
        };
        let grain = match cached {
            Some(grain) => grain,
            None => {
                let input = self.co_read_compressed_input(host)?;
                let whole = self.geo.grain_size <= MAX_CACHED_GRAIN;
                let want = if whole {
                    self.geo.grain_size as usize
                } else {
                    skip as usize + buf.len()
                };
                let mut out = vec![0u8; want];
                let n = inflate_zlib(&input, &mut out).map_err(|why| {
                    self.file
                        .corrupt(format!("the compressed grain at {host:#x}: {why}"))
                })?;
                out.truncate(n);
                let grain: Arc<[u8]> = out.into();
                if whole {
                    *self.inflated.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((host, grain.clone()));
                }
                grain
            }
        };
        let src = grain
            .get(skip as usize..skip as usize + buf.len())
            .ok_or_else(|| {
                self.file.corrupt(format!(
                    "the compressed grain at {host:#x} inflates to {} bytes, fewer than the \
                 {} read",
                    grain.len(),
                    skip as usize + buf.len()
                ))
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// The compressed bytes of the grain at `host` (after its marker, if the extent has
    /// them): at most two grains' worth, as QEMU reads, and no further than the file's end.
    #[cold]
    fn co_read_compressed_input(&self, host: u64) -> Result<Vec<u8>> {
        let gs = self.geo.grain_size;
        let (start, len) = if self.geo.markers {
            let mut marker = [0u8; GRAIN_MARKER_LEN as usize];
            self.file.co_read(host, &mut marker)?;
            let size = u32::from_le_bytes([marker[8], marker[9], marker[10], marker[11]]);
            if size == 0 {
                return Err(self.file.corrupt(format!(
                    "the grain at {host:#x} starts with a metadata marker, not a grain marker"
                )));
            }
            (host + GRAIN_MARKER_LEN, u64::from(size))
        } else {
            (host, 2 * gs)
        };
        // QEMU reads at most two grains' worth of compressed bytes.
        if len > 2 * gs {
            return Err(self.file.corrupt(format!(
                "the compressed grain at {host:#x} claims {len} bytes, more than two grains"
            )));
        }
        let len = len.min(self.file.len().saturating_sub(start));
        let mut input = vec![0u8; len as usize];
        self.file.co_read(start, &mut input)?;
        Ok(input)
    }

    /// The status at extent offset `pos` and how many bytes (≤ `len`) share it. Scans at most
    /// to the end of one allocated grain table's range; ranges without a table cost nothing
    /// and are crossed at once. QEMU: `vmdk_co_block_status()` (which answers per grain).
    pub(super) fn co_block_status(&self, pos: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let gs = self.geo.grain_size;
        let span = self.geo.gt_span();
        let first = self.co_lookup(pos)?.status();
        let mut n = 0u64;
        let mut tables = 0;
        while n < len {
            let at = pos + n;
            let has_table = self.gd.get((at / span) as usize).is_some_and(|&s| s != 0);
            if !has_table {
                // No grain table: its whole range is unallocated.
                if first != BlockStatus::Zero {
                    break;
                }
                n += span - at % span;
                continue;
            }
            if n == 0 || at.is_multiple_of(span) {
                tables += 1;
                if tables > 1 {
                    break;
                }
            }
            match self.co_lookup(at) {
                Ok(g) if g.status() == first => n += gs - at % gs,
                // A different status, or a bad entry that the next call reports.
                _ => break,
            }
        }
        Ok((first, n.clamp(1, len)))
    }
}

/// Little-endian `u32`s.
fn decode(raw: &[u8]) -> Vec<u32> {
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Inflates the zlib stream (RFC 1950: header, deflate, Adler-32) in `input` into `out`;
/// returns how many bytes it wrote: all of `out` (the stream may go on: a read of a grain's
/// first bytes), or fewer if the stream ended (checksum verified) before. An error if it is
/// malformed, truncated or its checksum is wrong. QEMU uses zlib's `uncompress()`.
pub fn inflate_zlib(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, &'static str> {
    let mut state = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
        | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        TINFLStatus::Done => Ok(written),
        TINFLStatus::HasMoreOutput if written == out.len() => Ok(written),
        TINFLStatus::Adler32Mismatch => Err("checksum mismatch"),
        TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
            Err("the stream is truncated")
        }
        _ => Err("the stream is malformed"),
    }
}

#[cfg(test)]
mod tests {
    use super::inflate_zlib;

    #[test]
    fn zlib_streams_inflate_in_part_or_whole() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let z = miniz_oxide::deflate::compress_to_vec_zlib(&data, 6);
        let mut all = vec![0u8; 5000];
        assert_eq!(inflate_zlib(&z, &mut all), Ok(5000), "whole");
        assert_eq!(all, data);
        let mut part = vec![0u8; 100];
        assert_eq!(inflate_zlib(&z, &mut part), Ok(100), "a prefix");
        assert_eq!(part, data[..100]);
        let mut more = vec![0u8; 6000];
        assert_eq!(
            inflate_zlib(&z, &mut more),
            Ok(5000),
            "the stream ends first"
        );
        let mut bad = z.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(inflate_zlib(&bad, &mut all).is_err(), "checksum");
        assert!(
            inflate_zlib(&z[..z.len() / 2], &mut all).is_err(),
            "truncated"
        );
        assert!(inflate_zlib(&[0xff; 64], &mut all).is_err(), "garbage");
    }
}
