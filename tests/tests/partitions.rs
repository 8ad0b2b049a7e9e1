//! Partitions without root tools (issue 14 item 2): a directory mountpoint shows the whole
//! image and one `<name>-partN` file per partition of its MBR or GPT table, each a read-write
//! window of its partition's size; `--partition N` exports just that partition. Tables are made
//! by the real tools (`sfdisk`, `sgdisk`); the oracle for where bytes land is the image file
//! itself (raw) or `qemu-img convert -O raw` (qcow2), read at the offsets the tools were given.
//!
//! Models: `qemu-nbd --partition` (removed in QEMU 6.0), nbdkit's partition filter, and the
//! kernel's own partition block devices (fixed size: writes stop at the end, truncate EINVAL).

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tests::*;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// The MBR layout used below, in sectors: primaries 1 and 2, an extended partition from
/// 34816 to the end with logicals 5 and 6 (numbered as Linux does).
const MBR_SCRIPT: &str = "label: dos\n\
    start=2048, size=16384, type=83\n\
    start=18432, size=16384, type=83\n\
    start=34816, type=5\n\
    start=36864, size=8192, type=83\n\
    start=47104, size=8192, type=83\n";

/// (number, first byte, size) of each partition of `MBR_SCRIPT`.
const MBR_PARTS: [(u32, u64, u64); 4] = [
    (1, 2048 * SECTOR, 16384 * SECTOR),
    (2, 18432 * SECTOR, 16384 * SECTOR),
    (5, 36864 * SECTOR, 8192 * SECTOR),
    (6, 47104 * SECTOR, 8192 * SECTOR),
];

/// GPT layout: entry 1 of 8 MiB at 1 MiB, entry 2 of 40 MiB at 10 MiB, entry 4 of 4 MiB at
/// 52 MiB (entry 3 empty: numbers are entry indexes, as Linux numbers them).
const GPT_PARTS: [(u32, u64, u64); 3] = [
    (1, MIB, 8 * MIB),
    (2, 10 * MIB, 40 * MIB),
    (4, 52 * MIB, 4 * MIB),
];

fn sfdisk(img: &Path, script: &str) {
    let mut child = tool("sfdisk")
        .arg("-q")
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run sfdisk");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write the sfdisk script");
    assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
}

/// A 64 MiB raw image with the `MBR_SCRIPT` table and random bytes everywhere else.
fn mbr_image(path: &Path) -> Vec<u8> {
    random_image(path, 64 * MIB as usize, 14);
    sfdisk(path, MBR_SCRIPT);
    read_all(path)
}

/// A 64 MiB raw image with the `GPT_PARTS` table (sgdisk), zeros elsewhere.
fn gpt_image(path: &Path) {
    sparse_image(path, 64 * MIB);
    let mut args: Vec<String> = vec!["-o".into()];
    for (n, start, size) in GPT_PARTS {
        let (first, last) = (start / SECTOR, (start + size) / SECTOR - 1);
        args.push(format!("--new={n}:{first}:{last}"));
        args.push(format!("--typecode={n}:8300"));
    }
    let out = run(tool("sgdisk").args(&args).arg(path));
    assert!(out.success(), "sgdisk failed\n{out}");
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read the export directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn part_path(e: &Export, n: u32) -> PathBuf {
    let mut name = e.path().file_name().expect("name").to_os_string();
    name.push(format!("-part{n}"));
    e.mountpoint().join(name)
}

/// The directory shows the image and its four MBR partitions (logicals 5 and 6 included) with
/// the sizes sfdisk was given; what is written into each partition file lands at that
/// partition's offset of the whole disk, and nothing else of the image changes; a partition
/// file and the whole-disk file see each other's writes at once (no cache between them).
#[test]
fn mbr_partitions_are_windows_of_the_disk() {
    require!(fuse_available(), have_tools(&["sfdisk"]));
    let dir = workdir();
    let img = dir.path().join("disk.img");
    let mut model = mbr_image(&img);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut e = Export::start(&img, &mnt, &["-f", "raw"]);

    let mut want = vec!["disk.img".to_owned()];
    want.extend(MBR_PARTS.iter().map(|(n, ..)| format!("disk.img-part{n}")));
    assert_eq!(names_in(&mnt), want, "directory listing\n{}", e.logs());
    assert_eq!(file_size(e.path()), 64 * MIB);
    for (n, start, size) in MBR_PARTS {
        let p = part_path(&e, n);
        assert_eq!(file_size(&p), size, "size of partition {n}");
        // Reading a partition file is reading the disk at its offset.
        let got = read_all(&p);
        assert_same_bytes(
            &got,
            &model[start as usize..(start + size) as usize],
            &format!("partition {n} read through its file"),
        );
    }

    let disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(e.path())
        .unwrap();
    for (i, (n, start, size)) in MBR_PARTS.into_iter().enumerate() {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(part_path(&e, n))
            .unwrap();
        // At the start, in the middle (unaligned) and up to the last byte.
        for (j, at) in [0, size / 2 + 123, size - 4096].into_iter().enumerate() {
            let data = random_bytes(100 * i as u64 + j as u64, 4096);
            f.write_all_at(&data, at).unwrap();
            let off = (start + at) as usize;
            model[off..off + data.len()].copy_from_slice(&data);
            let mut back = vec![0u8; data.len()];
            disk.read_exact_at(&mut back, start + at).unwrap();
            assert_same_bytes(
                &back,
                &data,
                &format!("partition {n}+{at} seen in the disk file"),
            );
        }
        // And the other way round.
        let data = random_bytes(900 + i as u64, 1000);
        disk.write_all_at(&data, start + 8192).unwrap();
        model[(start + 8192) as usize..(start + 8192) as usize + 1000].copy_from_slice(&data);
        let mut back = vec![0u8; 1000];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert_same_bytes(&back, &data, &format!("disk write seen in partition {n}"));
        f.sync_all().unwrap();
    }
    drop(disk);
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &model,
        "the image after the export stopped",
    );
}

/// Partition files keep their size: a write across the end is short and one at the end writes
/// nothing (`dd` reports ENOSPC, as on a partition device), truncate to another size is EINVAL (to the same
/// size, a no-op), fallocate past the end ENOSPC; the whole disk may not shrink below its
/// partitions (EBUSY) but may grow (`--growable`), and the windows do not move.
#[test]
fn partition_files_keep_their_size() {
    require!(fuse_available(), have_tools(&["sfdisk"]));
    let dir = workdir();
    let img = dir.path().join("disk.img");
    let model = mbr_image(&img);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut e = Export::start(&img, &mnt, &["-f", "raw", "--growable"]);
    let (n, start, size) = MBR_PARTS[2];
    let p = part_path(&e, n);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();

    let data = random_bytes(7, 8192);
    let written = f
        .write_at(&data, size - 4096)
        .expect("write across the end");
    assert_eq!(written, 4096, "a write across the partition's end is short");
    // At the end, 0 bytes (as the export's end, QEMU's rule): dd then says ENOSPC.
    assert_eq!(f.write_at(&data, size).expect("a write at the end"), 0);
    let out = sh!(
        "dd",
        "if=/dev/zero",
        format!("of={}", p.display()),
        "bs=4096",
        "count=2",
        format!("seek={}", size / 4096 - 1),
        "conv=notrunc"
    );
    assert!(
        !out.success() && out.stderr.contains("No space left on device"),
        "dd across the end of a partition\n{out}"
    );
    let err = f.set_len(size / 2).expect_err("truncate of a partition");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    let err = f.set_len(size + 4096).expect_err("growing a partition");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    f.set_len(size)
        .expect("truncate to its own size is a no-op");
    let r = sh!("fallocate", "-o", size.to_string(), "-l", "4096", &p);
    assert!(
        !r.success(),
        "fallocate past the end of a partition succeeded\n{r}"
    );
    assert_eq!(file_size(&p), size);
    let mut tail = vec![0u8; 4096];
    f.read_exact_at(&mut tail, size - 4096).unwrap();
    assert_same_bytes(
        &tail,
        &[0u8; 4096],
        "dd's zeros in the last block of the partition",
    );
    let next = start + size;
    let mut after = vec![0u8; 4096];
    fs::File::open(e.path())
        .unwrap()
        .read_exact_at(&mut after, next)
        .unwrap();
    assert_same_bytes(
        &after,
        &model[next as usize..next as usize + 4096],
        "the bytes after the partition are untouched",
    );

    let disk = fs::OpenOptions::new().write(true).open(e.path()).unwrap();
    let err = disk
        .set_len(20 * MIB)
        .expect_err("shrinking below partition 6 (ends at 27 MiB)");
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    disk.set_len(80 * MIB).expect("the whole disk still grows");
    assert_eq!(file_size(e.path()), 80 * MIB);
    assert_eq!(file_size(&p), size, "the partition did not move or grow");
    drop((f, disk));
    e.stop_ok();
    assert_eq!(file_size(&img), 80 * MIB);
}

/// The issue's acceptance test: an ext4 file system made in a partition file of a GPT disk in a
/// qcow2 image, mounted with `mount -o loop`, written, unmounted, `e2fsck` clean; after the
/// export stops, `qemu-img convert -O raw` of the image holds that file system at the
/// partition's offset (e2fsck clean there too), the GPT still parses (`sgdisk -v`), and the
/// other partitions are still zero. Then `--partition 2` on a file mountpoint exports just that
/// file system: mounted read-only, the files are there.
#[test]
fn ext4_in_a_gpt_partition_of_a_qcow2_image() {
    require!(
        fuse_available(),
        is_root(),
        have_tools(&[
            "sgdisk",
            "qemu-img",
            "mkfs.ext4",
            "e2fsck",
            "mount",
            "umount"
        ])
    );
    if !Path::new("/dev/loop-control").exists() {
        skip("no loop devices (/dev/loop-control)");
        return;
    }
    let dir = workdir();
    let raw = dir.path().join("gpt.raw");
    gpt_image(&raw);
    let img = dir.path().join("gpt.qcow2");
    sh!("qemu-img", "convert", "-f", "raw", "-O", "qcow2", &raw, &img).ok();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let fsdir = dir.path().join("fs");
    fs::create_dir(&fsdir).unwrap();

    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let mut want = vec!["gpt.qcow2".to_owned()];
    want.extend(GPT_PARTS.iter().map(|(n, ..)| format!("gpt.qcow2-part{n}")));
    assert_eq!(names_in(&mnt), want, "directory listing\n{}", e.logs());
    for (n, _, size) in GPT_PARTS {
        assert_eq!(file_size(&part_path(&e, n)), size, "size of partition {n}");
    }
    let p2 = part_path(&e, 2);
    sh!("mkfs.ext4", "-F", "-q", &p2).ok();
    let files: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| {
            (
                format!("f{i}"),
                random_bytes(40 + i, (i as usize + 1) * 300_000),
            )
        })
        .collect();
    {
        let mut m = FsMount::mount(&p2, &fsdir, &["-t", "ext4", "-o", "loop"]);
        for (name, data) in &files {
            fs::write(fsdir.join(name), data).unwrap();
        }
        m.umount();
    }
    let out = sh!("e2fsck", "-fn", &p2);
    assert!(
        out.success(),
        "e2fsck on the partition file\n{out}\n{}",
        e.logs()
    );
    e.stop_ok();
    assert!(qemu_img_check(&img).success(), "{}", qemu_img_check(&img));

    // The oracle: qemu-img's own reading of the image, at the partition's offset.
    let back = dir.path().join("back.raw");
    sh!("qemu-img", "convert", "-f", "qcow2", "-O", "raw", &img, &back).ok();
    let out = sh!("sgdisk", "-v", &back);
    assert!(
        out.success() && out.stdout.contains("No problems found"),
        "{out}"
    );
    let whole = read_all(&back);
    let (_, start, size) = GPT_PARTS[1];
    let part = dir.path().join("part2.raw");
    fs::write(&part, &whole[start as usize..(start + size) as usize]).unwrap();
    let out = sh!("e2fsck", "-fn", &part);
    assert!(
        out.success(),
        "e2fsck at partition 2's offset of the image\n{out}"
    );
    for (n, start, size) in [GPT_PARTS[0], GPT_PARTS[2]] {
        assert!(
            whole[start as usize..(start + size) as usize]
                .iter()
                .all(|&b| b == 0),
            "partition {n} was written"
        );
    }

    let file_mnt = dir.path().join("part2");
    fs::write(&file_mnt, b"").unwrap();
    let mut e = Export::start(&img, &file_mnt, &["--partition", "2", "-r"]);
    assert_eq!(file_size(&file_mnt), size);
    // The mounted line comes just after INIT, a moment after the mount appears.
    wait_until(std::time::Duration::from_secs(15), || {
        e.stdout().contains("exported")
    });
    assert!(
        e.stdout().contains("partition 2"),
        "mounted line\n{}",
        e.logs()
    );
    {
        let mut m = FsMount::mount(&file_mnt, &fsdir, &["-t", "ext4", "-o", "loop,ro"]);
        for (name, data) in &files {
            assert_same_bytes(&fs::read(fsdir.join(name)).unwrap(), data, name);
        }
        m.umount();
    }
    e.stop_ok();
}

/// `--partition N` on a raw MBR image: the file mountpoint is that partition (a logical one
/// here), reads and writes land in its window of the image; SEEK_DATA/SEEK_HOLE answer in the
/// partition's own offsets.
#[test]
fn partition_option_exports_one_window() {
    require!(fuse_available(), have_tools(&["sfdisk"]));
    let dir = workdir();
    let img = dir.path().join("disk.img");
    sparse_image(&img, 64 * MIB);
    sfdisk(&img, MBR_SCRIPT);
    let (n, start, size) = MBR_PARTS[3];
    // Data 1 MiB into partition 6, a hole everywhere else in it.
    let data = random_bytes(6, 64 * 1024);
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&data, start + MIB)
        .unwrap();
    let mnt = dir.path().join("p6");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["-f", "raw", "--partition", &n.to_string()]);
    assert_eq!(file_size(&mnt), size);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mnt)
        .unwrap();
    let mut got = vec![0u8; data.len()];
    f.read_exact_at(&mut got, MIB).unwrap();
    assert_same_bytes(&got, &data, "partition 6 read at its own offset");
    if supports_holes(dir.path()) {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on an fd we own; no memory is passed.
        let at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(at as u64, MIB, "SEEK_DATA in the partition's offsets");
        // SAFETY: as above.
        let at = unsafe { libc::lseek(f.as_raw_fd(), MIB as i64, libc::SEEK_HOLE) };
        assert_eq!(at as u64, MIB + 64 * 1024, "SEEK_HOLE after the data");
    }
    let new = random_bytes(66, 4096);
    f.write_all_at(&new, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    e.stop_ok();
    let mut back = vec![0u8; 4096];
    fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, start)
        .unwrap();
    assert_same_bytes(&back, &new, "the write at the partition's first byte");
}

/// A damaged table is a warning and no partition files, never a wrong window: two MBR entries
/// made to overlap, then a GPT whose header CRC no longer matches. An image with no table (an
/// ext4 file system on the whole disk) has no partition files and no warning.
#[test]
fn a_damaged_table_shows_only_the_image() {
    require!(fuse_available(), have_tools(&["sfdisk", "sgdisk"]));
    let dir = workdir();
    let mbr = dir.path().join("mbr.img");
    sparse_image(&mbr, 64 * MIB);
    sfdisk(&mbr, MBR_SCRIPT);
    // Entry 2 starts inside entry 1.
    let f = fs::OpenOptions::new().write(true).open(&mbr).unwrap();
    f.write_all_at(&4096u32.to_le_bytes(), 0x1BE + 16 + 8)
        .unwrap();
    drop(f);
    let gpt = dir.path().join("gpt.img");
    gpt_image(&gpt);
    let f = fs::OpenOptions::new().write(true).open(&gpt).unwrap();
    f.write_all_at(b"X", SECTOR + 40).unwrap(); // inside the header: its CRC fails
    drop(f);
    let plain = dir.path().join("plain.img");
    sparse_image(&plain, 64 * MIB);

    for (img, warning) in [
        (&mbr, Some("partitions 1 and 2 overlap")),
        (&gpt, Some("GPT header CRC mismatch")),
        (&plain, None),
    ] {
        let mnt = dir.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let mut e = Export::start(img, &mnt, &["-f", "raw"]);
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(names_in(&mnt), vec![name.clone()], "{}", e.logs());
        match warning {
            Some(w) => assert!(
                e.stderr().contains("WARN") && e.stderr().contains(w),
                "{name}: no warning naming '{w}'\n{}",
                e.logs()
            ),
            None => assert!(!e.stderr().contains("partition"), "{}", e.logs()),
        }
        e.stop_ok();
        // --partition on such an image is an error, with the reason.
        let out = coro_fuse_expect_exit(
            &[
                arg(Path::new("--partition")),
                "1".into(),
                arg(img),
                arg(&mnt),
            ],
            Some(&mnt),
        );
        assert_eq!(out.code(), Some(1), "{out}");
        let why = warning.unwrap_or("has no partition table");
        assert!(out.stderr.contains(why), "{out}");
    }
}

/// `--partition` errors: a number the table does not have exits 1 naming the ones it has;
/// 0, and combinations that make no sense (`--growable`, `--offset`, `--create`), exit 2.
#[test]
fn partition_option_errors() {
    require!(fuse_available(), have_tools(&["sfdisk"]));
    let dir = workdir();
    let img = dir.path().join("disk.img");
    sparse_image(&img, 64 * MIB);
    sfdisk(&img, MBR_SCRIPT);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let out = coro_fuse_expect_exit(
        &[
            arg(Path::new("--partition")),
            "3".into(),
            arg(&img),
            arg(&mnt),
        ],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("no partition 3") && out.stderr.contains("1, 2, 5, 6"),
        "{out}"
    );
    for extra in [
        &["--partition", "0"][..],
        &["--partition", "1", "--growable"],
        &["--partition", "1", "--offset", "4096"],
        &["--partition", "1", "--create", "1G"],
    ] {
        let mut args: Vec<std::ffi::OsString> = extra.iter().map(|s| s.into()).collect();
        args.extend([arg(&img), arg(&mnt)]);
        let out = coro_fuse_expect_exit(&args, Some(&mnt));
        assert_eq!(out.code(), Some(2), "{extra:?}\n{out}");
    }
    assert_eq!(fuse_mounts_at(&mnt), 0);
}
