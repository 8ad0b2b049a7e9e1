//! The qcow2 header: the on-disk layout (big endian, pinned size) and its validation.
//!
//! QEMU: `docs/interop/qcow2.txt` ("Header", "Header extensions", "Feature name table"),
//! `block/qcow2.c` `qcow2_do_open()` and `qcow2_read_extensions()`.
//!
//! [`RawHeader`] mirrors the bytes (`#[repr(C)]` of big-endian fields, size and offsets asserted
//! at compile time); [`Header::parse`] turns the untrusted first cluster of the file into typed,
//! checked values or a [`BlockError`] naming the problem. It never panics, whatever the bytes (a
//! fuzz-style test below feeds it mutations). Unlike fuser's zerocopy casts, `RawHeader` is filled
//! by safe per-field copies at `offset_of!` positions: no dependency, no `unsafe`, and a short
//! (version 2) header simply reads zeros for the missing version 3 fields.
//!
//! What is refused, and why: encryption (`crypt_method`, or a crypto header extension), an
//! external data file (the incompatible bit or the data file name extension), extended L2
//! entries (subclusters), a compression type other than deflate (0) and zstd (1), a compression
//! type that disagrees with incompatible bit 3, any unknown incompatible feature bit, the
//! corrupt bit; and as corrupt: tables (L1, refcount table, snapshot table) that are unaligned or
//! not inside the file, impossible sizes (virtual size ≥ 2^63, too many snapshots, a header
//! extension or backing file name that overflows the first cluster).
//! Accepted here on purpose: the dirty bit and any `refcount_order` up to 6 — reads never
//! consult refcounts; a *writable* open then rebuilds the refcounts of a dirty image
//! (`super::repair`) and refuses widths other than 16 bits (`Qcow2Driver::open_with`) —
//! snapshots (only the active L1 table is used), bitmaps and other compatible/autoclear
//! features, a backing file (its name and format are parsed here; `super::backing` opens it).
//!
//! The driver rewrites only the header fields it changes, at their own offsets
//! ([`FIELD_SIZE`] and friends); extensions and unknown fields are never touched.

use std::mem::{offset_of, size_of};

use crate::{BlockError, Result};

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster sizes QEMU supports (512 B ..= 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's `QCOW_MAX_L1_SIZE`: at most 32 MiB of L1 table, which bounds our memory too.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Header length of version 2 (the fields up to `snapshots_offset`).
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum header length of version 3 (up to `header_length`).
pub const V3_MIN_HEADER_LEN: u32 = 104;

/// Byte offsets of the header fields the writable driver updates in place.
pub const FIELD_SIZE: u64 = offset_of!(RawHeader, size) as u64;
/// `l1_size` (4 bytes) directly followed by `l1_table_offset` (8 bytes): one write moves L1.
pub const FIELD_L1_SIZE: u64 = offset_of!(RawHeader, l1_size) as u64;
/// `refcount_table_offset` (8 bytes) directly followed by `refcount_table_clusters` (4 bytes).
pub const FIELD_REFCOUNT_TABLE: u64 = offset_of!(RawHeader, refcount_table_offset) as u64;
pub const FIELD_INCOMPATIBLE: u64 = offset_of!(RawHeader, incompatible_features) as u64;
pub const FIELD_AUTOCLEAR: u64 = offset_of!(RawHeader, autoclear_features) as u64;
const _: () = assert!(offset_of!(RawHeader, l1_table_offset) == offset_of!(RawHeader, l1_size) + 4);
const _: () = assert!(
    offset_of!(RawHeader, refcount_table_clusters)
        == offset_of!(RawHeader, refcount_table_offset) + 8
);

/// Incompatible feature bits. QEMU: `QCOW2_INCOMPAT_*`.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types. QEMU: `QCOW2_EXT_MAGIC_*`.
const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// `compression_type` values. QEMU: `QCOW2_COMPRESSION_TYPE_ZLIB`, `_ZSTD`.
pub const COMPRESSION_DEFLATE: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The unit of a qcow2 image's virtual size as QEMU reads it (`BDRV_SECTOR_SIZE`).
pub const SECTOR_SIZE: u64 = 512;

/// Longest backing file name QEMU accepts (`backing_file_size` ≤ 1023).
pub const MAX_BACKING_NAME: u32 = 1023;

/// A big-endian `u32` as stored on disk (alignment 1, so [`RawHeader`] has no padding).
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct Be32(pub [u8; 4]);

/// A big-endian `u64` as stored on disk.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct Be64(pub [u8; 8]);

impl Be32 {
    pub fn get(self) -> u32 {
        u32::from_be_bytes(self.0)
    }
}

impl Be64 {
    pub fn get(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

/// The header as on disk, names as in `qcow2.txt` (QEMU: `QCowHeader`). Version 2 images end
/// after `snapshots_offset`; fields past the image's header length read as zero.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RawHeader {
    pub magic: Be32,
    pub version: Be32,
    pub backing_file_offset: Be64,
    pub backing_file_size: Be32,
    pub cluster_bits: Be32,
    pub size: Be64,
    pub crypt_method: Be32,
    pub l1_size: Be32,
    pub l1_table_offset: Be64,
    pub refcount_table_offset: Be64,
    pub refcount_table_clusters: Be32,
    pub nb_snapshots: Be32,
    pub snapshots_offset: Be64,
    // version 3
    pub incompatible_features: Be64,
    pub compatible_features: Be64,
    pub autoclear_features: Be64,
    pub refcount_order: Be32,
    pub header_length: Be32,
    pub compression_type: u8,
    pub padding: [u8; 7],
}

// Pinned layout, as in qcow2.txt.
const _: () = assert!(size_of::<RawHeader>() == 112);
const _: () = assert!(offset_of!(RawHeader, l1_table_offset) == 40);
const _: () = assert!(offset_of!(RawHeader, snapshots_offset) == 64);
const _: () = assert!(offset_of!(RawHeader, incompatible_features) == 72);
const _: () = assert!(offset_of!(RawHeader, header_length) == 100);
const _: () = assert!(offset_of!(RawHeader, compression_type) == 104);

/// Copies `N` bytes at `off` of `b` (zeros past its end: absent v3 fields read as zero).
fn field<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(off..) {
        let n = src.len().min(N);
        out[..n].copy_from_slice(&src[..n]);
    }
    out
}

impl RawHeader {
    /// Reads the header fields from the start of `b`; missing bytes read as zero.
    pub fn from_bytes(b: &[u8]) -> RawHeader {
        macro_rules! f {
            ($name:ident, $ty:ident) => {
                $ty(field(b, offset_of!(RawHeader, $name)))
            };
        }
        RawHeader {
            magic: f!(magic, Be32),
            version: f!(version, Be32),
            backing_file_offset: f!(backing_file_offset, Be64),
            backing_file_size: f!(backing_file_size, Be32),
            cluster_bits: f!(cluster_bits, Be32),
            size: f!(size, Be64),
            crypt_method: f!(crypt_method, Be32),
            l1_size: f!(l1_size, Be32),
            l1_table_offset: f!(l1_table_offset, Be64),
            refcount_table_offset: f!(refcount_table_offset, Be64),
            refcount_table_clusters: f!(refcount_table_clusters, Be32),
            nb_snapshots: f!(nb_snapshots, Be32),
            snapshots_offset: f!(snapshots_offset, Be64),
            incompatible_features: f!(incompatible_features, Be64),
            compatible_features: f!(compatible_features, Be64),
            autoclear_features: f!(autoclear_features, Be64),
            refcount_order: f!(refcount_order, Be32),
            header_length: f!(header_length, Be32),
            compression_type: field::<1>(b, offset_of!(RawHeader, compression_type))[0],
            padding: [0; 7],
        }
    }
}

impl RawHeader {
    /// The header's bytes as on disk (`size_of::<RawHeader>()` = 112, version 3 with the
    /// compression type field): the inverse of [`RawHeader::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; size_of::<RawHeader>()];
        macro_rules! put {
            ($($name:ident),*) => {
                $(
                    let v = &self.$name.0;
                    let at = offset_of!(RawHeader, $name);
                    b[at..at + v.len()].copy_from_slice(v);
                )*
            };
        }
        put!(
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length
        );
        b[offset_of!(RawHeader, compression_type)] = self.compression_type;
        b
    }
}

/// A validated header: everything the read path needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// 9 ..= 21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries of the active L1 table (covers `size`, at most [`MAX_L1_BYTES`] / 8).
    pub l1_size: u32,
    /// Host offset of the L1 table: cluster aligned, inside the file.
    pub l1_table_offset: u64,
    /// Any order up to 6 for reads (which never consult refcounts); writable opens need 4.
    pub refcount_order: u32,
    /// Host offset of the refcount table (validated only by writable opens).
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    /// Autoclear feature bits (a writable open clears them: we do not maintain bitmaps).
    pub autoclear_features: u64,
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table (checked to lie in the file when `nb_snapshots > 0`).
    pub snapshots_offset: u64,
    /// The length of the header proper; extensions follow.
    pub header_length: u32,
    /// The backing file name as stored (relative to the image's directory unless absolute).
    pub backing_file: Option<std::path::PathBuf>,
    /// From the backing file format extension, if present ("qcow2", "raw", …).
    pub backing_format: Option<String>,
    /// Feature name table entries: (type 0/1/2, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// [`COMPRESSION_DEFLATE`] or [`COMPRESSION_ZSTD`] (validated against incompatible bit 3).
    pub compression_type: u8,
    /// Whether a bitmaps extension is present (persistent dirty bitmaps; reads ignore them).
    pub has_bitmaps: bool,
    /// Types of header extensions this driver does not know, in file order (skipped).
    pub unknown_extensions: Vec<u32>,
}

fn corrupt(why: String) -> BlockError {
    BlockError::Corrupt(format!("qcow2 header: {why}"))
}

fn refuse(why: String) -> BlockError {
    BlockError::Invalid(format!("qcow2: {why}"))
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (no extended L2: 8 bytes each).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Parses and validates `head` (the first cluster of the file, or the whole file when it is
    /// shorter) of a file of `file_len` bytes.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header> {
        let raw = RawHeader::from_bytes(head);
        if raw.magic.get() != QCOW2_MAGIC {
            return Err(corrupt(format!(
                "bad magic {:#010x} (expected QFI\\xfb)",
                raw.magic.get()
            )));
        }
        let version = raw.version.get();
        if version != 2 && version != 3 {
            return Err(refuse(format!(
                "unsupported qcow2 version {version} (2 and 3 are)"
            )));
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} out of range \
                 {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (header_length, refcount_order, incompat, compat, autoclear) = if version == 2 {
            (V2_HEADER_LEN, 4, 0, 0, 0)
        } else {
            (
                raw.header_length.get(),
                raw.refcount_order.get(),
                raw.incompatible_features.get(),
                raw.compatible_features.get(),
                raw.autoclear_features.get(),
            )
        };
        if version == 3 {
            if header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0 {
                return Err(corrupt(format!("bad header_length {header_length}")));
            }
            if u64::from(header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header_length {header_length} exceeds the cluster size {cluster_size}"
                )));
            }
        }
        if (head.len() as u64) < u64::from(header_length) {
            return Err(corrupt(format!(
                "the file ({file_len} bytes) is too short for the header ({header_length})"
            )));
        }
        if refcount_order > 6 {
            return Err(corrupt(format!("refcount_order {refcount_order} > 6")));
        }
        let size = raw.size.get();
        if size > i64::MAX as u64 {
            return Err(corrupt(format!("virtual size {size} is too large")));
        }
        // QEMU keeps the size in sectors (`bs->total_sectors = header.size / 512`): a header
        // that says 1000 bytes is a 512-byte disk there, and so it is here.
        let size = size - size % SECTOR_SIZE;
        let mut header = Header {
            version,
            cluster_bits,
            size,
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_order,
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            incompatible_features: incompat,
            compatible_features: compat,
            autoclear_features: autoclear,
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            header_length,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            compression_type: COMPRESSION_DEFLATE,
            has_bitmaps: false,
            unknown_extensions: Vec::new(),
        };
        header.read_extensions(head, cluster_size)?;
        header.check_features(&raw)?;
        header.check_compression(&raw)?;
        header.read_backing_name(&raw, head, cluster_size)?;
        header.check_l1(file_len)?;
        header.check_other_tables(&raw, file_len)?;
        Ok(header)
    }

    /// Header extensions between the header and the end of the first cluster (or the backing
    /// file name). Unknown ones are skipped. QEMU: `qcow2_read_extensions()`.
    fn read_extensions(&mut self, head: &[u8], cluster_size: u64) -> Result<()> {
        let end = (head.len() as u64).min(cluster_size) as usize;
        let mut off = self.header_length as usize;
        if self.version == 2 {
            // v2 images may have extensions too, right after the 72-byte header.
            off = V2_HEADER_LEN as usize;
        }
        while off + 8 <= end {
            let ty = u32::from_be_bytes(field(head, off));
            let len = u32::from_be_bytes(field(head, off + 4)) as usize;
            off += 8;
            if ty == EXT_END {
                return Ok(());
            }
            let data = off
                .checked_add(len)
                .filter(|&e| e <= end)
                .map(|e| &head[off..e])
                .ok_or_else(|| {
                    corrupt(format!(
                        "header extension {ty:#x} ({len} bytes at {off}) overflows the cluster"
                    ))
                })?;
            match ty {
                EXT_BACKING_FORMAT => {
                    // QEMU copies it into a C string: a NUL ends it.
                    let name = data.split(|&c| c == 0).next().unwrap_or_default();
                    self.backing_format = Some(String::from_utf8_lossy(name).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(46)];
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_CRYPTO => {
                    return Err(refuse(
                        "encrypted images are not supported (crypto header extension)".into(),
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(refuse(format!(
                        "external data files are not supported (data file '{}')",
                        String::from_utf8_lossy(data)
                    )))
                }
                _ => self.unknown_extensions.push(ty),
            }
            off = off.saturating_add(len.div_ceil(8) * 8);
        }
        Ok(())
    }

    /// The name of incompatible feature `bit` from the image's feature table, if it has one.
    fn incompat_name(&self, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|(ty, b, _)| *ty == 0 && u32::from(*b) == bit)
            .map_or_else(
                || format!("bit {bit}"),
                |(_, _, n)| format!("bit {bit} ({n})"),
            )
    }

    fn check_features(&self, raw: &RawHeader) -> Result<()> {
        if raw.crypt_method.get() != 0 {
            return Err(refuse(format!(
                "encrypted images are not supported (crypt_method {})",
                raw.crypt_method.get()
            )));
        }
        let incompat = self.incompatible_features;
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(refuse(
                "the image is marked corrupt; repair it with 'qemu-img check -r all'".into(),
            ));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(refuse("external data files are not supported".into()));
        }
        if incompat & INCOMPAT_EXTL2 != 0 {
            return Err(refuse(
                "extended L2 entries (subclusters) are not supported".into(),
            ));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| self.incompat_name(b))
                .collect();
            return Err(refuse(format!(
                "unknown incompatible feature(s): {}",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// The compression type byte exists from header length 105 on; incompatible bit 3 must be
    /// set exactly when it is not deflate. QEMU: `validate_compression_type()`.
    fn check_compression(&mut self, raw: &RawHeader) -> Result<()> {
        let ctype = if self.header_length > 104 {
            raw.compression_type
        } else {
            COMPRESSION_DEFLATE
        };
        if ctype != COMPRESSION_DEFLATE && ctype != COMPRESSION_ZSTD {
            return Err(refuse(format!(
                "unknown compression type {ctype} (0 deflate and 1 zstd are supported)"
            )));
        }
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit != (ctype != COMPRESSION_DEFLATE) {
            return Err(corrupt(format!(
                "compression type {ctype} but the compression type feature bit is {}",
                if bit { "set" } else { "clear" }
            )));
        }
        self.compression_type = ctype;
        Ok(())
    }

    /// The backing file name: `backing_file_size` bytes at `backing_file_offset`, inside the
    /// first cluster; no NUL bytes (a path cannot hold one). An empty name means no backing
    /// file, as in QEMU. QEMU: `qcow2_do_open()`.
    fn read_backing_name(&mut self, raw: &RawHeader, head: &[u8], cluster_size: u64) -> Result<()> {
        let off = raw.backing_file_offset.get();
        if off == 0 {
            return Ok(());
        }
        let len = raw.backing_file_size.get();
        let bytes = off
            .checked_add(u64::from(len))
            .filter(|&e| len <= MAX_BACKING_NAME && e <= cluster_size && e <= head.len() as u64)
            .map(|e| &head[off as usize..e as usize])
            .ok_or_else(|| corrupt(format!("bad backing file name ({len} bytes at {off})")))?;
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.contains(&0) {
            return Err(corrupt(format!(
                "bad backing file name '{}'",
                String::from_utf8_lossy(bytes).escape_debug()
            )));
        }
        use std::os::unix::ffi::OsStrExt;
        self.backing_file = Some(std::ffi::OsStr::from_bytes(bytes).into());
        Ok(())
    }

    /// The refcount table and the snapshot table are not read here (the refcount table is
    /// loaded by a writable open, `refcount.rs`; snapshots are left alone), but an image whose
    /// tables cannot exist is refused as QEMU does. QEMU: `validate_table_offset()` calls in `qcow2_do_open()`.
    fn check_other_tables(&self, raw: &RawHeader, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let rt_offset = raw.refcount_table_offset.get();
        let rt_clusters = raw.refcount_table_clusters.get();
        if rt_clusters == 0 {
            return Err(corrupt("the image has no refcount table".into()));
        }
        check_table(
            "refcount table",
            rt_offset,
            u64::from(rt_clusters) * cs,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "too many snapshots ({}, at most {MAX_SNAPSHOTS})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            // Entries have a variable length: check that the table starts inside the file.
            let offset = raw.snapshots_offset.get();
            check_table("snapshot table", offset, 1, cs, file_len)?;
        }
        Ok(())
    }

    fn check_l1(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_l2 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l2);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(format!(
                "the L1 table ({} entries) does not cover the virtual size ({} bytes needs {needed})",
                self.l1_size, self.size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "the L1 table is too large ({l1_bytes} bytes, at most {MAX_L1_BYTES})"
            )));
        }
        if !self.l1_table_offset.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "L1 table offset {:#x} is not cluster aligned",
                self.l1_table_offset
            )));
        }
        if self.l1_size > 0 {
            let inside = matches!(self.l1_table_offset.checked_add(l1_bytes),
                                  Some(end) if end <= file_len);
            if !inside || self.l1_table_offset == 0 {
                return Err(corrupt(format!(
                    "L1 table ({l1_bytes} bytes at {:#x}) is not inside the file ({file_len} bytes)",
                    self.l1_table_offset
                )));
            }
        }
        Ok(())
    }
}

/// A table of `len` bytes at `offset` must be cluster aligned, not at offset 0 (the header is
/// there), and inside the file.
fn check_table(what: &str, offset: u64, len: u64, cluster_size: u64, file_len: u64) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(corrupt(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    let inside = matches!(offset.checked_add(len), Some(end) if end <= file_len);
    if offset == 0 || !inside {
        return Err(corrupt(format!(
            "{what} ({len} bytes at {offset:#x}) is not inside the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header (64 KiB clusters, 1 GiB, refcount table at 0x10000, L1 at
    /// 0x30000) in a first cluster.
    fn valid() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&8u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    const FILE_LEN: u64 = 0x40000;

    #[test]
    fn parses_a_valid_header() {
        let h = Header::parse(&valid(), FILE_LEN).expect("valid");
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_size, 8);
    }

    fn set_ok(off: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = valid();
        b[off..off + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn refuses_bad_fields() {
        let set = |off: usize, bytes: &[u8]| {
            let mut b = valid();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            Header::parse(&b, FILE_LEN)
                .expect_err("must be refused")
                .to_string()
        };
        assert!(set(0, b"QFI\0").contains("magic"));
        assert!(set(20, &30u32.to_be_bytes()).contains("cluster_bits 30"));
        assert!(set(40, &0x30200u64.to_be_bytes()).contains("aligned"));
        assert!(set(40, &0x50000u64.to_be_bytes()).contains("not inside the file"));
        assert!(set(36, &1u32.to_be_bytes()).contains("does not cover"));
        assert!(set(32, &1u32.to_be_bytes()).contains("encrypted"));
        assert!(set(79, &[2]).contains("corrupt"));
        assert!(set(79, &[4]).contains("external data"));
        assert!(set(79, &[16]).contains("extended L2"));
        assert!(set(79, &[32]).contains("bit 5"));
        assert!(set(104, &[1]).contains("feature bit is clear"));
        assert!(set(79, &[8]).contains("feature bit is set"));
        assert!(set(104, &[2]).contains("unknown compression type 2"));
        let mut long_name = valid();
        long_name[8..16].copy_from_slice(&0x1000u64.to_be_bytes());
        long_name[16..20].copy_from_slice(&1024u32.to_be_bytes());
        let e = Header::parse(&long_name, FILE_LEN).expect_err("1024-byte backing name");
        assert!(e.to_string().contains("bad backing file name"), "{e}");
        long_name[16..20].copy_from_slice(&4u32.to_be_bytes());
        let e = Header::parse(&long_name, FILE_LEN).expect_err("NUL bytes in the name");
        assert!(e.to_string().contains("bad backing file name"), "{e}");
        let empty = Header::parse(&set_ok(8, &0x1000u64.to_be_bytes()), FILE_LEN);
        assert_eq!(
            empty.expect("empty name").backing_file,
            None,
            "empty: no backing file"
        );
        assert!(set(24, &u64::MAX.to_be_bytes()).contains("too large"));
        assert!(set(56, &0u32.to_be_bytes()).contains("no refcount table"));
        assert!(set(48, &0x10200u64.to_be_bytes()).contains("refcount table offset"));
        assert!(set(48, &0x80000u64.to_be_bytes()).contains("refcount table"));
        assert!(set(60, &70000u32.to_be_bytes()).contains("too many snapshots"));
        assert!(set(60, &1u32.to_be_bytes()).contains("snapshot table"));
        assert!(set(4, &1u32.to_be_bytes()).contains("version 1"));
        Header::parse(&valid()[..50], FILE_LEN).expect_err("short");
    }

    /// Appends header extensions (type, data) after the 112-byte header, with the end marker.
    fn with_extensions(exts: &[(u32, &[u8])]) -> Vec<u8> {
        let mut b = valid();
        let mut off = 112;
        for (ty, data) in exts {
            b[off..off + 4].copy_from_slice(&ty.to_be_bytes());
            b[off + 4..off + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += 8 + data.len().div_ceil(8) * 8;
        }
        b
    }

    #[test]
    fn extensions_are_kept_or_refused() {
        let mut table = vec![0u8; 48];
        table[1] = 5;
        table[2..7].copy_from_slice(b"magic");
        let mut b = with_extensions(&[
            (EXT_BACKING_FORMAT, b"raw"),
            (EXT_FEATURE_TABLE, &table),
            (EXT_BITMAPS, &[0; 24]),
            (0x1234_5678, b"?"),
        ]);
        // Backing file name after the extensions.
        b[0x200..0x208].copy_from_slice(b"base.img");
        b[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        let h = Header::parse(&b, FILE_LEN).expect("valid");
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(
            h.backing_file.as_deref(),
            Some(std::path::Path::new("base.img"))
        );
        assert_eq!(h.feature_names, vec![(0, 5, "magic".to_string())]);
        assert!(h.has_bitmaps);
        assert_eq!(h.unknown_extensions, vec![0x1234_5678]);
        // The name of an unknown incompatible bit comes from the table.
        b[79] = 32;
        let e = Header::parse(&b, FILE_LEN).expect_err("bit 5").to_string();
        assert!(e.contains("bit 5 (magic)"), "{e}");

        let e = Header::parse(&with_extensions(&[(EXT_DATA_FILE, b"data.raw")]), FILE_LEN);
        assert!(e
            .expect_err("data file")
            .to_string()
            .contains("data file 'data.raw'"));
        let e = Header::parse(&with_extensions(&[(EXT_CRYPTO, &[0; 16])]), FILE_LEN);
        assert!(e.expect_err("crypto").to_string().contains("encrypted"));
        let e = Header::parse(
            &with_extensions(&[(EXT_BITMAPS, &[0; 24])])[..140],
            FILE_LEN,
        );
        assert!(e.expect_err("overflow").to_string().contains("overflows"));
    }

    #[test]
    fn zstd_needs_its_feature_bit() {
        let mut b = valid();
        b[104] = COMPRESSION_ZSTD;
        b[79] = 8;
        let h = Header::parse(&b, FILE_LEN).expect("zstd image");
        assert_eq!(h.compression_type, COMPRESSION_ZSTD);
        // A 104-byte header has no compression type byte: deflate, whatever follows.
        b[79] = 0;
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        let h = Header::parse(&b, FILE_LEN).expect("v3 header without the type byte");
        assert_eq!(h.compression_type, COMPRESSION_DEFLATE);
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = valid();
        for i in 0..4000 {
            let mut b = base[..4096].to_vec();
            if i % 4 == 0 {
                // Pure random bytes, keeping the magic half of the time.
                for x in b.iter_mut().take(256) {
                    *x = next() as u8;
                }
                if i % 8 == 0 {
                    b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
                }
            } else {
                for _ in 0..(1 + next() % 8) {
                    let pos = (next() % 160) as usize;
                    b[pos] = next() as u8;
                }
            }
            let len = (next() % 4097) as usize;
            let _ = Header::parse(&b[..len], next() % (1 << 24));
        }
    }
}
