//! Writes through corrupt qcow2 tables never overwrite metadata (found by the `qcow2_image`
//! fuzz target: an L2 entry with COPIED set that points at the L2 table itself let a guest write
//! replace the table, silently). A data cluster, or a newly allocated cluster, that is an active
//! L2 table or a refcount block fails the request as corrupt (EIO), marks the image corrupt, and
//! leaves the table as it was. QEMU: `qcow2_check_metadata_overlap()`, `overlap-check=cached`.
//!
//! The images are built by hand in memory (`block::fuzzing::MemDriver`), no `qemu-img` needed:
//! 512-byte clusters — header, refcount table, refcount block, L1 table, L2 table, then data.

mod common;

use std::sync::Arc;

use block::backend::{BackendOptions, BlockBackend};
use block::fuzzing::MemDriver;
use block::{BlockError, Qcow2Driver};
use common::co;

const CS: u64 = 512;
const REFTABLE: u64 = CS;
const REFBLOCK: u64 = 2 * CS;
const L1: u64 = 3 * CS;
const L2: u64 = 4 * CS;
const COPIED: u64 = 1 << 63;

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

/// A 64 KiB v3 image with one L2 table whose entry 3 is `entry`; clusters 0..=5 counted (the
/// fifth is a data cluster mapped at guest cluster 0).
fn image(entry: u64) -> Vec<u8> {
    let mut b = vec![0u8; 6 * CS as usize];
    put(&mut b, 0, b"QFI\xfb");
    put(&mut b, 4, &3u32.to_be_bytes());
    put(&mut b, 20, &9u32.to_be_bytes());
    put(&mut b, 24, &(64u64 << 10).to_be_bytes());
    put(&mut b, 36, &2u32.to_be_bytes()); // 64 KiB needs two L2 tables of 64 entries
    put(&mut b, 40, &L1.to_be_bytes());
    put(&mut b, 48, &REFTABLE.to_be_bytes());
    put(&mut b, 56, &1u32.to_be_bytes());
    put(&mut b, 96, &4u32.to_be_bytes());
    put(&mut b, 100, &112u32.to_be_bytes());
    put(&mut b, REFTABLE, &REFBLOCK.to_be_bytes());
    for c in 0..6 {
        put(&mut b, REFBLOCK + 2 * c, &1u16.to_be_bytes());
    }
    put(&mut b, L1, &(L2 | COPIED).to_be_bytes());
    put(&mut b, L2, &((5 * CS) | COPIED).to_be_bytes());
    put(&mut b, L2 + 3 * 8, &entry.to_be_bytes());
    b
}

/// Opens `bytes` writable in memory; returns the node, the backend and the memory image.
fn open(bytes: Vec<u8>) -> (Arc<Qcow2Driver>, Arc<BlockBackend>, Arc<MemDriver>) {
    let mem = Arc::new(MemDriver::new(bytes, false, 1 << 20));
    let driver = Arc::new(Qcow2Driver::open(mem.clone()).expect("the image opens"));
    let opts = BackendOptions {
        read_only: false,
        write_beyond_eof: false,
        ..BackendOptions::default()
    };
    let blk = Arc::new(BlockBackend::new(driver.clone(), opts).expect("backend"));
    (driver, blk, mem)
}

fn cluster(b: &[u8], at: u64) -> Vec<u8> {
    b[at as usize..(at + CS) as usize].to_vec()
}

/// A write to guest cluster 3, whose entry is `entry`, fails as corrupt and leaves the table at
/// `table` unchanged.
fn write_is_refused(entry: u64, table: u64) {
    let bytes = image(entry);
    let before = cluster(&bytes, table);
    let (driver, blk, mem) = open(bytes);
    let b = blk.clone();
    let r = co(move || b.co_pwrite(3 * CS, &[0xee; CS as usize]));
    assert!(matches!(r, Err(BlockError::Corrupt(_))), "{r:?}");
    assert!(driver.is_corrupt());
    assert_eq!(
        cluster(&mem.contents(), table),
        before,
        "the table was overwritten"
    );
    // The other clusters still read; later writes are refused.
    let b = blk.clone();
    let (read, again) = co(move || {
        let mut buf = vec![0u8; CS as usize];
        (b.co_pread(0, &mut buf), b.co_pwrite(0, &[1; 512]))
    });
    assert!(read.is_ok() && again.is_err(), "{read:?} {again:?}");
}

#[test]
fn a_data_cluster_that_is_the_l2_table_is_not_written() {
    write_is_refused(L2 | COPIED, L2);
}

#[test]
fn a_data_cluster_that_is_a_refcount_block_is_not_written() {
    write_is_refused(REFBLOCK | COPIED, REFBLOCK);
}

#[test]
fn a_new_cluster_that_the_refcounts_call_free_is_not_an_l2_table() {
    // The refcount block says the L2 table's cluster is free: the first allocation gets it.
    let mut bytes = image(0);
    put(&mut bytes, REFBLOCK + 2 * (L2 / CS), &0u16.to_be_bytes());
    let before = cluster(&bytes, L2);
    let (driver, blk, mem) = open(bytes);
    let r = co(move || blk.co_pwrite(3 * CS, &[0xee; CS as usize]));
    assert!(matches!(r, Err(BlockError::Corrupt(_))), "{r:?}");
    assert!(driver.is_corrupt());
    assert_eq!(
        cluster(&mem.contents(), L2),
        before,
        "the L2 table was overwritten"
    );
}

#[test]
fn a_clean_image_writes_and_reads_back() {
    let (driver, blk, _mem) = open(image(0));
    let data = co(move || {
        blk.co_pwrite(3 * CS, &[0xee; CS as usize])?;
        blk.co_pwrite(40 * CS, &[0xdd; CS as usize])?;
        let mut buf = vec![0u8; 2 * CS as usize];
        blk.co_pread(3 * CS, &mut buf[..CS as usize])?;
        blk.co_pread(40 * CS, &mut buf[CS as usize..])?;
        Ok::<_, BlockError>(buf)
    })
    .expect("writes to a clean image");
    assert!(data[..512].iter().all(|&b| b == 0xee) && data[512..].iter().all(|&b| b == 0xdd));
    assert!(!driver.is_corrupt());
}
