//! Creating an empty qcow2 image, as `qemu-img create -f qcow2 IMAGE SIZE` does.
//!
//! QEMU: `qcow2_co_create()` in `block/qcow2.c` (the defaults: version 3, 64 KiB clusters,
//! 16-bit refcounts, deflate compression, no backing file, no preallocation).
//!
//! The layout is QEMU's for an empty image: cluster 0 the header, cluster 1 the refcount table
//! (one cluster: it covers 16 TiB of host file with 64 KiB clusters and 16-bit refcounts),
//! cluster 2 the one refcount block (counting every metadata cluster, refcount 1), then the L1
//! table from cluster 3 — all zeros (no L2 table yet), several clusters for sizes above 4 TiB.
//! The file is extended over the L1 table with `set_len`, so it stays sparse whatever the size.
//!
//! An *overlay* ([`create_qcow2_overlay`], `qemu-img create -f qcow2 -b BACKING -F FMT`) is the
//! same empty image with a backing file: after the 112-byte header come the backing format
//! extension (type `0xE2792ACA`, the format name padded to 8 bytes), the end-of-extensions
//! marker, and the backing file name, which `backing_file_offset`/`backing_file_size` point at —
//! all inside cluster 0, as QEMU lays it out. Every cluster is then unallocated, so every read
//! goes to the backing file until the guest writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{
    Be32, Be64, RawHeader, COMPRESSION_DEFLATE, EXT_BACKING_FORMAT, MAX_BACKING_NAME, MAX_L1_BYTES,
    QCOW2_MAGIC, SECTOR_SIZE,
};
use crate::{BlockError, Result};

/// `qemu-img create`'s default cluster size (64 KiB).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// The only refcount width the writable driver maintains (16 bits).
pub const REFCOUNT_ORDER: u32 = 4;

/// Creates a new qcow2 image of `size` bytes at `path`; refuses to overwrite an existing file
/// (`BlockError::Open` with `ErrorKind::AlreadyExists`). On failure the new file is removed.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    create_with(path, size, None)
}

/// Creates a new qcow2 image of `size` bytes at `path` whose backing file is `backing` (the
/// name stored in the header, as given: a relative name is resolved against the directory of
/// `path` when the image is opened) in format `backing_format` (`"raw"`, `"qcow2"`, recorded in
/// the backing format extension so the backing file is never probed). Refuses an existing file.
///
/// QEMU: `qemu-img create -f qcow2 -b BACKING -F FORMAT PATH SIZE`.
pub fn create_qcow2_overlay(
    path: &Path,
    size: u64,
    backing: &Path,
    backing_format: &str,
) -> Result<()> {
    create_with(path, size, Some((backing, backing_format)))
}

fn create_with(path: &Path, size: u64, backing: Option<(&Path, &str)>) -> Result<()> {
    check_size(size)?;
    if let Some((name, format)) = backing {
        let len = name.as_os_str().len();
        if len == 0 || len > MAX_BACKING_NAME as usize {
            return Err(BlockError::Invalid(format!(
                "qcow2: a backing file name must have 1 to {MAX_BACKING_NAME} bytes: '{}'",
                name.display()
            )));
        }
        if format.is_empty()
            || format.len() > 16
            || !format.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(BlockError::Invalid(format!(
                "qcow2: '{format}' is not a backing format name"
            )));
        }
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if let Err(e) = format_with(&file, size, backing) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Why `size` cannot be the virtual size of a qcow2 image [`create_qcow2`] makes, if it cannot:
/// not a multiple of 512 bytes (QEMU keeps sizes in sectors), or more than the largest L1
/// table maps (2 PiB with 64 KiB clusters).
pub fn check_size(size: u64) -> Result<()> {
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::Invalid(format!(
            "qcow2: the image size ({size} bytes) must be a multiple of {SECTOR_SIZE} bytes"
        )));
    }
    if size > i64::MAX as u64 || l1_entries(size, DEFAULT_CLUSTER_BITS) * 8 > MAX_L1_BYTES {
        return Err(BlockError::Invalid(format!(
            "qcow2: the image size ({size} bytes) is too large"
        )));
    }
    Ok(())
}

/// L1 entries needed to map `size` bytes (each L2 table maps `cluster_size / 8` clusters).
fn l1_entries(size: u64, cluster_bits: u32) -> u64 {
    let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(per_l2)
}

/// Writes an empty qcow2 image of `size` bytes into `file` (empty, opened for writing) and
/// syncs it.
pub fn format_qcow2(file: &File, size: u64) -> Result<()> {
    format_with(file, size, None)
}

/// [`format_qcow2`] with an optional backing file (name, format): see [`create_qcow2_overlay`].
fn format_with(file: &File, size: u64, backing: Option<(&Path, &str)>) -> Result<()> {
    check_size(size)?;
    let cluster_bits = DEFAULT_CLUSTER_BITS;
    let c = 1u64 << cluster_bits;
    let l1_size = l1_entries(size, cluster_bits);
    let l1_clusters = (l1_size * 8).div_ceil(c).max(1);
    let (reftable, refblock, l1) = (c, 2 * c, 3 * c);
    let clusters = 3 + l1_clusters;
    // The refcount block covers `c * 8 / 16` clusters: the metadata (at most 3 + 512) fits.
    debug_assert!(clusters <= (c * 8) >> REFCOUNT_ORDER);

    // Cluster 0 after the header: [backing format extension], end marker, [backing name].
    let header_len = std::mem::size_of::<RawHeader>();
    let mut exts = Vec::new();
    let mut name_at = 0u64;
    let mut name_bytes: &[u8] = &[];
    if let Some((name, format)) = backing {
        exts.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        exts.extend_from_slice(&(format.len() as u32).to_be_bytes());
        exts.extend_from_slice(format.as_bytes());
        exts.resize(exts.len().next_multiple_of(8), 0);
        name_bytes = name.as_os_str().as_encoded_bytes();
        name_at = (header_len + exts.len() + 8) as u64;
    }
    let header = RawHeader {
        magic: Be32(QCOW2_MAGIC.to_be_bytes()),
        version: Be32(3u32.to_be_bytes()),
        cluster_bits: Be32(cluster_bits.to_be_bytes()),
        size: Be64(size.to_be_bytes()),
        l1_size: Be32((l1_size as u32).to_be_bytes()),
        l1_table_offset: Be64(l1.to_be_bytes()),
        refcount_table_offset: Be64(reftable.to_be_bytes()),
        refcount_table_clusters: Be32(1u32.to_be_bytes()),
        refcount_order: Be32(REFCOUNT_ORDER.to_be_bytes()),
        header_length: Be32((std::mem::size_of::<RawHeader>() as u32).to_be_bytes()),
        compression_type: COMPRESSION_DEFLATE,
        backing_file_offset: Be64(name_at.to_be_bytes()),
        backing_file_size: Be32((name_bytes.len() as u32).to_be_bytes()),
        ..RawHeader::default()
    };
    let mut head = header.to_bytes();
    debug_assert_eq!(head.len(), header_len);
    head.extend_from_slice(&exts);
    // The end of the header extensions (an all-zero extension header, type 0).
    head.resize(8 + head.len(), 0);
    head.extend_from_slice(name_bytes);
    debug_assert!(head.len() as u64 <= c);

    let mut block = vec![0u8; c as usize];
    for i in 0..clusters as usize {
        block[2 * i..2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let io = |e| BlockError::Io(e);
    // Extend first (the L1 table reads as zeros: a hole), then the tables, the header last.
    file.set_len(clusters * c).map_err(io)?;
    file.write_all_at(&block, refblock).map_err(io)?;
    file.write_all_at(&refblock.to_be_bytes(), reftable)
        .map_err(io)?;
    file.write_all_at(&head, 0).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::Header;

    #[test]
    fn l1_sizes() {
        assert_eq!(l1_entries(1 << 20, 16), 1);
        assert_eq!(l1_entries(512 << 20, 16), 1);
        assert_eq!(l1_entries((512 << 20) + 512, 16), 2);
        assert_eq!(l1_entries(100 << 30, 16), 200);
        assert_eq!(l1_entries(4 << 40, 16), 8192);
    }

    #[test]
    fn sizes_refused() {
        assert!(matches!(check_size(1000), Err(BlockError::Invalid(_))));
        assert!(matches!(check_size(1 << 63), Err(BlockError::Invalid(_))));
        // 32 MiB of L1 maps 2 PiB: one sector more is too much.
        assert!(check_size(2 << 50).is_ok());
        assert!(check_size((2 << 50) + 512).is_err());
    }

    #[test]
    fn the_header_parses() {
        let dir = tempfile::tempdir().unwrap();
        for size in [512, 1 << 20, 5 << 40] {
            let path = dir.path().join(format!("{size}.qcow2"));
            create_qcow2(&path, size).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let h = Header::parse(&bytes[..65536], bytes.len() as u64).unwrap();
            assert_eq!((h.version, h.cluster_bits, h.size), (3, 16, size));
            assert_eq!(h.l1_size as u64, l1_entries(size, 16));
            assert_eq!((h.refcount_order, h.header_length), (4, 112));
            assert!(
                create_qcow2(&path, size).is_err(),
                "an existing file is kept"
            );
        }
    }

    #[test]
    fn the_overlay_header_names_its_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("top.qcow2");
        create_qcow2_overlay(&path, 1 << 30, Path::new("/images/base disk.raw"), "raw").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let h = Header::parse(&bytes[..65536], bytes.len() as u64).unwrap();
        assert_eq!(h.size, 1 << 30);
        assert_eq!(
            h.backing_file.as_deref(),
            Some(Path::new("/images/base disk.raw"))
        );
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        for (name, format) in [("", "raw"), ("b", ""), ("b", "ra w")] {
            let p = dir.path().join("bad.qcow2");
            assert!(create_qcow2_overlay(&p, 1 << 20, Path::new(name), format).is_err());
            assert!(!p.exists(), "nothing is left behind");
        }
        let long = "x".repeat(1024);
        let p = dir.path().join("long.qcow2");
        assert!(create_qcow2_overlay(&p, 1 << 20, Path::new(&long), "raw").is_err());
    }
}
