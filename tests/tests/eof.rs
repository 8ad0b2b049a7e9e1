//! The end of the file: post-EOF reads and writes, growing with fallocate, growable exports,
//! truncate, write-zeroes (punch hole, zero range).
//!
//! QEMU: `tests/qemu-iotests/308` "Resizing exports" (try growing a non-growable export,
//! post-EOF and half-post-EOF `dd`, resize with fallocate, growable export, shrink) and
//! "Writing zeroes while unmapping".

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// 308 "Try growing non-growable export": writes at or after EOF write nothing and `dd` says
/// "No space left on device"; a write across EOF is short; reads at/after EOF return nothing,
/// across EOF are short.
#[test]
fn post_eof_io_on_non_growable_export() {
    require!(fuse_available(), have_tools(&["dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let len = 4 * MIB;
    let mut data = random_image(&img, len as usize, 308010);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let p = e.path().to_path_buf();
    let of = format!("of={}", p.display());
    let ifp = format!("if={}", p.display());

    // Squarely at EOF and after it: nothing written.
    for seek in [len, len + 32 * KIB] {
        let out = sh!(
            "dd",
            "if=/dev/zero",
            &of,
            "bs=1",
            "count=64k",
            format!("seek={seek}"),
            "conv=notrunc"
        )
        .fails();
        assert!(
            out.stderr.contains("No space left on device"),
            "dd at {seek} past EOF: {out}"
        );
        assert!(
            out.stderr.contains("0+0 records out"),
            "dd at {seek} must write nothing: {out}"
        );
        assert_eq!(file_size(&p), len, "the export must not grow");
    }

    // Across EOF: the part before EOF is written, then ENOSPC.
    let pattern = dir.path().join("pattern");
    fs::write(&pattern, vec![0xc3u8; 4096]).unwrap();
    let out = sh!(
        "dd",
        format!("if={}", pattern.display()),
        &of,
        "bs=4096",
        "count=1",
        format!("seek={}", len - 1000),
        "oflag=seek_bytes",
        "conv=notrunc"
    )
    .fails();
    assert!(
        out.stderr.contains("No space left on device"),
        "dd across EOF: {out}"
    );
    data[(len - 1000) as usize..].fill(0xc3);

    // The same with pwrite: short, then zero.
    let f = open_rw(&p);
    assert_eq!(
        f.write_at(&[0x3c; 4096], len - 100).unwrap(),
        100,
        "pwrite across EOF is short"
    );
    data[(len - 100) as usize..].fill(0x3c);
    assert_eq!(
        f.write_at(&[0x3c; 4096], len).unwrap(),
        0,
        "pwrite at EOF writes nothing"
    );
    assert_eq!(
        f.write_at(&[0x3c; 10], len + MIB).unwrap(),
        0,
        "pwrite after EOF writes nothing"
    );

    // Reads: half past EOF is short, at/after EOF empty.
    let out = sh!(
        "dd",
        &ifp,
        "of=/dev/null",
        "bs=512",
        "count=128",
        format!("skip={}", (len - 32 * KIB) / 512)
    )
    .ok();
    assert!(
        out.stderr.contains("64+0 records in"),
        "half-post-EOF dd read: {out}"
    );
    let out = sh!(
        "dd",
        &ifp,
        "of=/dev/null",
        "bs=1",
        "count=1",
        format!("skip={}", len + 32 * KIB)
    );
    assert!(
        out.stderr.contains("0+0 records in"),
        "post-EOF dd read: {out}"
    );
    let mut buf = vec![0u8; 8192];
    assert_eq!(
        f.read_at(&mut buf, len - 100).unwrap(),
        100,
        "pread across EOF is short"
    );
    assert_eq!(&buf[..100], &data[(len - 100) as usize..]);
    assert_eq!(f.read_at(&mut buf, len).unwrap(), 0, "pread at EOF");
    assert_eq!(
        f.read_at(&mut buf, len + 32 * KIB).unwrap(),
        0,
        "pread after EOF"
    );
    drop(f);

    assert_eq!(file_size(&p), len);
    e.stop_ok();
    assert_eq!(file_size(&img), len, "image size");
    assert_same_bytes(&read_all(&img), &data, "image after post-EOF writes");
}

/// 308 "Resize export": fallocate at EOF grows a non-growable export (and allocates disk
/// space, as QEMU's preallocating truncate does); a read across the new, unaligned EOF is
/// short; fallocate mode 0 inside the file is not supported.
#[test]
fn fallocate_grows_the_export() {
    require!(fuse_available(), have_tools(&["fallocate", "dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let orig = 4 * MIB;
    let data = random_image(&img, orig as usize, 308011);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let p = e.path().to_path_buf();

    let bs = 128 * KIB;
    let extend_to = orig.div_ceil(bs) * bs + bs / 2;
    let usage_before = allocated(&img);
    sh!(
        "fallocate",
        "-o",
        orig.to_string(),
        "-l",
        (extend_to - orig).to_string(),
        &p
    )
    .ok();
    assert_eq!(file_size(&p), extend_to, "export size after fallocate");
    assert_eq!(file_size(&img), extend_to, "image size after fallocate");

    let out = sh!(
        "dd",
        format!("if={}", p.display()),
        "of=/dev/null",
        format!("bs={bs}"),
        "count=2",
        format!("skip={}", extend_to / bs)
    )
    .ok();
    assert!(
        out.stderr.contains("0+1 records in"),
        "read across the unaligned EOF: {out}"
    );

    let out = sh!("fallocate", "-o", "0", "-l", "1M", &p).fails();
    assert!(
        out.stderr.contains("Operation not supported"),
        "fallocate mode 0 before EOF: {out}"
    );

    let mut tail = vec![1u8; (extend_to - orig) as usize];
    let f = fs::File::open(&p).unwrap();
    f.read_exact_at(&mut tail, orig).unwrap();
    assert!(
        tail.iter().all(|&b| b == 0),
        "the grown part reads as zeroes"
    );
    drop(f);
    let usage_after = allocated(&img);
    e.stop_ok();
    let mut want = data;
    want.resize(extend_to as usize, 0);
    assert_same_bytes(&read_all(&img), &want, "image after fallocate");
    assert!(
        usage_after > usage_before,
        "308 'Disk usage grew with fallocate': allocated {usage_before} -> {usage_after} bytes (fallocate mode 0 should preallocate, not only truncate)"
    );
}

/// 308 "Try growing growable export": with --growable, writes past EOF grow the image, also
/// from several threads at once.
#[test]
fn growable_export_grows_on_write() {
    require!(fuse_available(), have_tools(&["dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let len = MIB + 333;
    let mut data = random_image(&img, len as usize, 308012);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--growable"]);
    let p = e.path().to_path_buf();

    sh!(
        "dd",
        "if=/dev/zero",
        format!("of={}", p.display()),
        "bs=1",
        "count=64k",
        format!("seek={len}"),
        "conv=notrunc"
    )
    .ok();
    assert_eq!(file_size(&p), len + 65536, "export size after dd past EOF");
    assert_eq!(file_size(&img), len + 65536, "image size after dd past EOF");
    data.resize((len + 65536) as usize, 0);

    // A write with a gap: the gap reads as zeroes.
    let f = open_rw(&p);
    let at = len + 65536 + MIB;
    assert_eq!(f.write_at(&[0x77; 5000], at).unwrap(), 5000);
    data.resize(at as usize, 0);
    data.extend_from_slice(&[0x77; 5000]);
    assert_eq!(file_size(&p), at + 5000);

    // Several threads appending disjoint chunks past EOF at once.
    let f = Arc::new(f);
    let base = data.len() as u64;
    let chunk = 40_000u64;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            thread::spawn(move || {
                for i in 0..8u64 {
                    let k = i * 4 + t;
                    let buf = vec![k as u8 + 1; chunk as usize];
                    assert_eq!(f.write_at(&buf, base + k * chunk).unwrap(), chunk as usize);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for k in 0..32u64 {
        data.extend(vec![k as u8 + 1; chunk as usize]);
    }
    assert_eq!(
        file_size(&p),
        data.len() as u64,
        "size after concurrent growth"
    );
    f.sync_all().unwrap();
    drop(f);
    assert_same_bytes(&read_all(&p), &data, "export after growth");
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after growth");
}

/// 308 "Shrink export": truncate shrinks and grows the export and the image.
#[test]
fn truncate_shrinks_and_grows() {
    require!(fuse_available(), have_tools(&["truncate"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, (4 * MIB) as usize, 308013);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let p = e.path().to_path_buf();

    sh!("truncate", "-s", (MIB + 333).to_string(), &p).ok();
    assert_eq!(file_size(&p), MIB + 333, "export size after shrinking");
    assert_eq!(file_size(&img), MIB + 333, "image size after shrinking");
    assert_same_bytes(
        &read_all(&p),
        &data[..(MIB + 333) as usize],
        "data after shrinking",
    );

    sh!("truncate", "-s", "3M", &p).ok();
    assert_eq!(file_size(&p), 3 * MIB, "export size after growing");
    let mut want = data[..(MIB + 333) as usize].to_vec();
    want.resize((3 * MIB) as usize, 0);
    assert_same_bytes(
        &read_all(&p),
        &want,
        "data after growing: the new part is zeroes",
    );

    // Through the API as well (ftruncate).
    open_rw(&p).set_len(2 * MIB).unwrap();
    assert_eq!(file_size(&p), 2 * MIB);
    want.truncate((2 * MIB) as usize);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &want, "image after truncates");
}

/// Write-zeroes: `fallocate -p` (punch hole, becomes write-zeroes with unmap) reads back as
/// zeroes, leaves a hole in the image, and SEEK_HOLE/SEEK_DATA report it; `fallocate -z` (zero
/// range) zeroes, and grows unless `-n`; other modes are not supported.
#[test]
fn punch_hole_and_zero_range() {
    require!(fuse_available(), have_tools(&["fallocate"]));
    let dir = workdir();
    if !supports_holes(dir.path()) {
        skip(&format!("{} has no holes", dir.path().display()));
        return;
    }
    let img = dir.path().join("t.img");
    let len = 8 * MIB;
    let mut data = random_image(&img, len as usize, 308014);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    // Deallocation needs QEMU's `discard=unmap` (the default, `ignore`, only zeroes).
    let mut e = Export::start(&img, &mnt, &["--discard", "unmap"]);
    let p = e.path().to_path_buf();
    let alloc_before = allocated(&img);

    sh!("fallocate", "-p", "-o", "1M", "-l", "2M", &p).ok();
    data[MIB as usize..(3 * MIB) as usize].fill(0);
    assert_eq!(file_size(&p), len, "punch hole keeps the size");
    assert_same_bytes(&read_all(&p), &data, "export after punch hole");
    let f = fs::File::open(&p).unwrap();
    assert_eq!(
        seek_hole(&f, 0).unwrap(),
        MIB,
        "SEEK_HOLE finds the punched hole"
    );
    assert_eq!(
        seek_data(&f, MIB).unwrap(),
        3 * MIB,
        "SEEK_DATA skips the punched hole"
    );
    let backing = fs::File::open(&img).unwrap();
    assert_eq!(
        seek_hole(&backing, 0).unwrap(),
        MIB,
        "the image has a hole (unmapped)"
    );
    assert!(
        allocated(&img) <= alloc_before - 2 * MIB,
        "punching should free space in the image"
    );

    // Zero range inside the file.
    sh!("fallocate", "-z", "-o", "5M", "-l", "64K", &p).ok();
    data[(5 * MIB) as usize..(5 * MIB + 64 * KIB) as usize].fill(0);
    // Zero range past EOF with KEEP_SIZE: no change.
    sh!(
        "fallocate",
        "-z",
        "-n",
        "-o",
        len.to_string(),
        "-l",
        "1M",
        &p
    )
    .ok();
    assert_eq!(
        file_size(&p),
        len,
        "zero range with keep-size must not grow"
    );
    // Zero range past EOF without it: grows.
    sh!("fallocate", "-z", "-o", len.to_string(), "-l", "1M", &p).ok();
    assert_eq!(file_size(&p), len + MIB, "zero range past EOF grows");
    data.resize((len + MIB) as usize, 0);
    assert_same_bytes(&read_all(&p), &data, "export after zero range");

    // Other modes: collapse range is not supported.
    let out = sh!("fallocate", "-c", "-o", "0", "-l", "1M", &p).fails();
    assert!(
        out.stderr.contains("Operation not supported"),
        "collapse range: {out}"
    );
    drop(f);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after write-zeroes");
}

/// 308 "Writing zeroes while unmapping" (QEMU issue 1507): `qemu-io write -zu` over the whole
/// export, then everything reads as zeroes, through the export and in the image.
#[test]
fn qemu_io_write_zeroes_with_unmap() {
    require!(fuse_available(), have_tools(&["qemu-io"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    random_image(&img, (64 * MIB) as usize, 1507);
    let mnt = dir.path().join("t.img.fuse");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let out = sh!("qemu-io", "-f", "raw", "-c", "write -zu 0 64M", &mnt).ok();
    assert!(
        out.stdout
            .contains("wrote 67108864/67108864 bytes at offset 0"),
        "{out}"
    );
    let out = sh!("qemu-io", "-f", "raw", "-c", "read -P 0 0 64M", &mnt).ok();
    assert!(
        out.stdout
            .contains("read 67108864/67108864 bytes at offset 0"),
        "read back through the export: {out}"
    );
    assert!(!out.all().contains("Pattern verification failed"), "{out}");
    e.stop_ok();
    let out = sh!("qemu-io", "-f", "raw", "-c", "read -P 0 0 64M", &img).ok();
    assert!(
        out.stdout
            .contains("read 67108864/67108864 bytes at offset 0"),
        "image: {out}"
    );
    assert!(
        !out.all().contains("Pattern verification failed"),
        "image: {out}"
    );
}
