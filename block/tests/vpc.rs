//! The vpc (VHD) driver against images made by the real `qemu-img`/`qemu-io`: every byte
//! equals `qemu-img convert -f vpc -O raw`, block status equals `qemu-img map`, the size equals
//! `qemu-img info`'s under each of QEMU's size rules (CHS, `current_size`); a fixed image is
//! recognised by its footer; corrupt images fail cleanly.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and
//! fails when `CI=true`.

mod common;

use std::path::Path;

use block::{BlockError, Format};
use common::qemu::{
    check_map_of, create, have_qemu, open_ro, open_ro_as, oracle_bytes_of, patch, qemu_io,
    read_all, run, virtual_size,
};
use common::{co, disk_dir};

const MIB: u64 = 1 << 20;

fn populate(path: &Path, size: u64) {
    let end = format!("write -P 0x5e {} 4k", size - 4096);
    qemu_io(
        "vpc",
        path,
        &[
            "write -P 0xab 4k 64k",
            "write -P 0xcd 3M 2M",
            "write -P 0x11 7M 512",
            &end,
        ],
    );
}

/// Creates, writes, and checks an image: probed as vpc, size, bytes, map.
fn roundtrip(opts: &str, size: u64) {
    let test = format!("vpc {opts} {size}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhd", "vpc", opts, size);
    let vsize = virtual_size(&path, "vpc");
    populate(&path, vsize);
    check(&path, vsize);
}

fn check(path: &Path, vsize: u64) {
    let blk = open_ro(path);
    assert_eq!(blk.format_name(), "vpc", "probed");
    assert_eq!(blk.size(), vsize, "the size qemu-img info reports");
    let expected = oracle_bytes_of(path, "vpc");
    for seed in [1, 2] {
        assert!(
            read_all(&blk, seed) == expected,
            "bytes differ from qemu-img convert"
        );
    }
    check_map_of(&blk, path, "vpc");
}

#[test]
fn dynamic_chs_sized() {
    // 10 MiB is not a CHS size: QEMU rounds it and keeps the geometry's size.
    roundtrip("subformat=dynamic", 10 * MIB);
}

#[test]
fn dynamic_force_size() {
    roundtrip("subformat=dynamic,force_size=on", 10 * MIB);
}

#[test]
fn fixed_chs_sized() {
    roundtrip("subformat=fixed", 10 * MIB);
}

#[test]
fn fixed_force_size() {
    roundtrip("subformat=fixed,force_size=on", 12 * MIB);
}

#[test]
fn converted_from_raw() {
    if !have_qemu("vpc converted") {
        return;
    }
    let dir = disk_dir();
    let raw = common::image(dir.path(), "src.raw", &common::pattern(5 * MIB as usize, 4));
    for sub in ["fixed", "dynamic"] {
        let path = dir.path().join(format!("{sub}.vhd"));
        run(std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vpc", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&raw)
            .arg(&path));
        check(&path, virtual_size(&path, "vpc"));
    }
}

/// The footer's creator application decides between CHS and `current_size`: an image by
/// "win " (Hyper-V) is sized by `current_size`, as `qemu-img info` says.
#[test]
fn creator_app_decides_the_size() {
    if !have_qemu("vpc creator app") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhd", "vpc", "subformat=dynamic", 10 * MIB);
    let chs_size = virtual_size(&path, "vpc");
    // current_size is the rounded-up size; make it differ from the CHS size.
    let mut footer = common::qemu::head(&path, 512);
    footer[48..56].copy_from_slice(&(10 * MIB + 64 * 1024).to_be_bytes());
    footer[28..32].copy_from_slice(b"win ");
    footer[64..68].fill(0);
    let sum = !footer
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    patch(&path, 0, &footer);
    let len = std::fs::metadata(&path).unwrap().len();
    patch(&path, len - 512, &footer);
    let vsize = virtual_size(&path, "vpc");
    assert_ne!(vsize, chs_size);
    assert_eq!(vsize, 10 * MIB + 64 * 1024);
    qemu_io("vpc", &path, &["write -P 0x77 10M 64k"]);
    check(&path, vsize);
}

#[test]
fn writable_open_is_refused() {
    if !have_qemu("vpc writable") {
        return;
    }
    let dir = disk_dir();
    for sub in ["fixed", "dynamic"] {
        let path = create(
            dir.path(),
            &format!("{sub}.vhd"),
            "vpc",
            &format!("subformat={sub}"),
            4 * MIB,
        );
        let e = block::open_image(&path, &block::OpenOptions::default()).expect_err("writable");
        assert!(
            matches!(e, BlockError::ReadOnlyFormat { format: "vpc", .. }),
            "{sub}: {e:?}"
        );
    }
}

#[test]
fn corrupt_images_fail_cleanly() {
    if !have_qemu("vpc corrupt") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhd", "vpc", "subformat=dynamic", 8 * MIB);
    qemu_io("vpc", &path, &["write -P 0xab 0 4k"]);
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&path, &p).unwrap();
        p
    };
    // A bad footer checksum.
    let p = copy("sum.vhd");
    patch(&p, 64, &[0xde, 0xad, 0xbe, 0xef]);
    assert!(open_ro_as(&p, Format::Vpc).is_err());
    // A BAT entry past the end of the file: refused at open ("truncated").
    let p = copy("bat.vhd");
    patch(&p, 3 * 512 + 4, &0x00ff_0000u32.to_be_bytes());
    let e = open_ro_as(&p, Format::Vpc).expect_err("BAT past EOF");
    assert!(e.to_string().contains("truncated"), "{e}");
    // Truncated file: the last block no longer fits.
    let p = copy("short.vhd");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(std::fs::metadata(&p).unwrap().len() - 4096)
        .unwrap();
    assert!(open_ro_as(&p, Format::Vpc).is_err());
    // A huge BAT entry count.
    let p = copy("entries.vhd");
    patch(&p, 512 + 28, &u32::MAX.to_be_bytes());
    assert!(open_ro_as(&p, Format::Vpc).is_err());
    // A truncated fixed image.
    let fixed = create(dir.path(), "fixed.vhd", "vpc", "subformat=fixed", 4 * MIB);
    let footer = std::fs::read(&fixed)
        .unwrap()
        .split_off(4 * MIB as usize - 512);
    let short = dir.path().join("fixed-short.vhd");
    let mut bytes = vec![0u8; MIB as usize];
    bytes.extend_from_slice(&footer[footer.len() - 512..]);
    std::fs::write(&short, &bytes).unwrap();
    let e = open_ro_as(&short, Format::Vpc).expect_err("truncated fixed");
    assert!(e.to_string().contains("truncated"), "{e}");
    // Still readable after all this.
    let blk = open_ro(&path);
    let b = blk.clone();
    let first = co(move || {
        let mut buf = [0u8; 1];
        b.co_pread(0, &mut buf).map(|()| buf[0])
    });
    assert_eq!(first.ok(), Some(0xab));
}
