//! The vdi driver against images made by the real `qemu-img`/`qemu-io`: every byte equals
//! `qemu-img convert -O raw`, block status equals `qemu-img map`, the size equals `qemu-img
//! info`'s; writable opens are refused with the `-r` message; corrupt images fail cleanly.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and
//! fails when `CI=true`.

mod common;

use std::path::Path;

use block::{open_image, BlockError, Format, OpenOptions};
use common::qemu::{
    check_map_of, create, have_qemu, open_ro, open_ro_as, oracle_bytes_of, patch, qemu_io,
    read_all, virtual_size,
};
use common::{co, disk_dir};

const MIB: u64 = 1 << 20;

/// Data in the first block, across a block boundary, a lone sector, the last bytes.
fn populate(path: &Path, size: u64) {
    // (qemu-io fails a 4 KiB write that ends at the end of a vdi image: a QEMU quirk, so the
    // last write is a sector, after a 4 KiB one just before the end.)
    let end = format!("write -P 0x5e {} 512", size - 512);
    let near_end = format!("write -P 0x5f {} 4k", size - 12288);
    qemu_io(
        "vdi",
        path,
        &[
            "write -P 0xab 4k 64k",
            "write -P 0xcd 1536k 1M",
            "write -P 0x11 5M 512",
            &near_end,
            &end,
        ],
    );
}

fn roundtrip(opts: &str, size: u64) {
    let test = format!("vdi {opts} {size}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vdi", "vdi", opts, size);
    populate(&path, virtual_size(&path, "vdi"));
    let blk = open_ro(&path);
    assert_eq!(blk.format_name(), "vdi", "probed");
    assert_eq!(blk.size(), virtual_size(&path, "vdi"));
    assert!(blk.is_read_only());
    let expected = oracle_bytes_of(&path, "vdi");
    for seed in [1, 2] {
        assert!(
            read_all(&blk, seed) == expected,
            "{test}: bytes differ from qemu-img convert"
        );
    }
    check_map_of(&blk, &path, "vdi");
}

#[test]
fn dynamic() {
    roundtrip("", 12 * MIB);
}

#[test]
fn dynamic_odd_size() {
    roundtrip("", 10 * MIB + 7 * 512);
}

#[test]
fn static_image() {
    roundtrip("static=on", 8 * MIB);
}

#[test]
fn converted_from_raw() {
    if !have_qemu("vdi converted") {
        return;
    }
    let dir = disk_dir();
    let raw = common::image(dir.path(), "src.raw", &common::pattern(3 * MIB as usize, 9));
    let path = dir.path().join("conv.vdi");
    common::qemu::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vdi"])
            .arg(&raw)
            .arg(&path),
    );
    let blk = open_ro(&path);
    assert!(read_all(&blk, 3) == std::fs::read(&raw).unwrap());
    check_map_of(&blk, &path, "vdi");
}

#[test]
fn writable_open_is_refused_with_the_way_out() {
    if !have_qemu("vdi writable") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vdi", "vdi", "", 4 * MIB);
    for format in [Format::Auto, Format::Vdi] {
        let opts = OpenOptions {
            format,
            ..OpenOptions::default()
        };
        let e = open_image(&path, &opts).expect_err("writable open");
        assert!(
            matches!(e, BlockError::ReadOnlyFormat { format: "vdi", .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("-r") && msg.contains("--snapshot"), "{msg}");
        assert_eq!(e.errno(), libc::EROFS);
    }
}

/// A map entry pointing past the end of the file: EIO on the read that reaches it, the rest
/// of the image still readable; bad headers: clear errors at open.
#[test]
fn corrupt_images_fail_cleanly() {
    if !have_qemu("vdi corrupt") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vdi", "vdi", "", 4 * MIB);
    qemu_io("vdi", &path, &["write -P 0xab 0 4k", "write -P 0xcd 2M 4k"]);
    let head = common::qemu::head(&path, 512);
    let bmap = u32::from_le_bytes(head[0x154..0x158].try_into().unwrap()) as u64;
    // Block 2's entry points far past the end.
    patch(&path, bmap + 8, &1000u32.to_le_bytes());
    let blk = open_ro(&path);
    let b = blk.clone();
    let (first, bad) = co(move || {
        let mut buf = vec![0u8; 4096];
        let first = b.co_pread(0, &mut buf).map(|()| buf[0]);
        let bad = b.co_pread(2 * MIB, &mut buf);
        (first, bad)
    });
    assert_eq!(first.ok(), Some(0xab));
    assert!(matches!(bad, Err(BlockError::Corrupt(_))), "{bad:?}");
    drop(blk);

    let cases: &[(&str, usize, &[u8])] = &[
        ("bad signature", 0x40, &[0, 0, 0, 0]),
        ("huge size", 0x170, &[0xff; 8]),
        ("block map past the end", 0x154, &[0, 0, 0, 0x7f]),
        ("unsupported block size", 0x178, &[0, 2, 0, 0]),
        ("parent uuid", 0x1b8, &[1]),
    ];
    for &(what, at, bytes) in cases {
        let p = dir.path().join(format!("{}.vdi", what.replace(' ', "-")));
        std::fs::copy(&path, &p).unwrap();
        patch(&p, at as u64, bytes);
        let e = open_ro_as(&p, Format::Vdi).expect_err(what);
        assert!(e.to_string().contains("vdi"), "{what}: {e}");
    }
    // Truncated inside the header.
    let p = dir.path().join("short.vdi");
    std::fs::write(&p, &head[..300]).unwrap();
    assert!(open_ro_as(&p, Format::Vdi).is_err());
}
