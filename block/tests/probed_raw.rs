//! The first sector of a *probed* raw image is guarded (QEMU `raw_co_pwritev()` with
//! `bs->probed`): a write, write-zeroes or discard that would make it probe as another format is
//! refused with EPERM, whole or in pieces; with an explicit raw format it is allowed.

mod common;

use std::path::Path;
use std::sync::Arc;

use block::{open_image, BlockBackend, BlockError, Format, OpenOptions};
use common::{co, disk_dir, image};

fn open(path: &Path, format: Format) -> Arc<BlockBackend> {
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    open_image(path, &opts).expect("open the raw image read-write")
}

/// A qcow2 header's first bytes, padded to a sector.
fn qcow2_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..8].copy_from_slice(b"QFI\xfb\x00\x00\x00\x03");
    s[8..16].copy_from_slice(&0x200u64.to_be_bytes()); // "backing file" at 0x200
    s
}

fn refused(r: block::Result<()>, what: &str) {
    match r {
        Err(e @ BlockError::Refused(_)) => {
            assert_eq!(e.errno(), libc::EPERM);
            assert!(
                e.to_string().contains("first sector of a probed raw image"),
                "{e}"
            );
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn probed_raw_refuses_format_magic_in_sector_zero() {
    let dir = disk_dir();
    let path = image(dir.path(), "disk.img", &vec![0u8; 1 << 20]);
    let blk = open(&path, Format::Auto);
    let b = blk.clone();
    co(move || {
        refused(b.co_pwrite(0, &qcow2_sector()), "whole qcow2 sector");
        let mut big = qcow2_sector();
        big.resize(8192, 0xee);
        refused(
            b.co_pwrite(0, &big),
            "a larger write starting with a header",
        );
        refused(b.co_pwrite(0, b"QFI\xfb"), "four bytes");
        // In pieces: each piece alone is harmless, together they form the magic.
        b.co_pwrite(0, b"QF").expect("two harmless bytes");
        refused(
            b.co_pwrite(2, b"I\xfb"),
            "the piece that completes the magic",
        );
        // Another format's magic, not at offset 0 (vdi at 0x40).
        refused(
            b.co_pwrite(0x40, &0xbeda_107fu32.to_le_bytes()),
            "vdi signature",
        );
        // Zeroing can complete a magic too: "QED\x05" → "QED\0".
        b.co_pwrite(0, b"QED\x05").expect("not a magic yet");
        refused(
            b.co_pwrite_zeroes(3, 1, false),
            "write-zeroes completing QED",
        );
        refused(b.co_pdiscard(3, 1), "discard completing QED");
        b.co_pdiscard(0, 4096)
            .expect("discarding the whole sector leaves zeros: fine");
    });
    drop(blk);
    let blk = open(&path, Format::Auto);
    let b = blk.clone();
    co(move || {
        // Ordinary writes to the sector and any write elsewhere are fine.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        b.co_pwrite(0, &mbr).expect("an MBR");
        b.co_pwrite(512, &qcow2_sector())
            .expect("a header in sector 1 is data");
        b.co_pwrite_zeroes(0, 4096, true)
            .expect("zeroing the start");
        b.co_pdiscard(0, 65536).expect("discard");
    });
    let bytes = std::fs::read(&path).expect("read");
    assert!(
        bytes[..512].iter().all(|&x| x == 0),
        "the refused writes left no trace"
    );
}

#[test]
fn explicit_raw_allows_any_first_sector() {
    let dir = disk_dir();
    let path = image(dir.path(), "disk.img", &vec![0u8; 65536]);
    let blk = open(&path, Format::Raw);
    let b = blk.clone();
    co(move || b.co_pwrite(0, &qcow2_sector())).expect("-f raw: allowed");
    blk.close().expect("close");
    drop(blk);
    assert_eq!(&std::fs::read(&path).expect("read")[..4], b"QFI\xfb");
}
