//! Where the image appears: a regular file (QEMU style), a directory (nbdfuse style), the image
//! itself; read-only exports; what is left when the export stops.
//!
//! QEMU: `tests/qemu-iotests/308` "Mountpoint is a directory", "Mountpoint is a regular file",
//! "Mount over existing file", "Remove export", "Writable export".

use std::fs;
use std::os::unix::fs::FileExt;

use tests::*;

/// 308 "Mountpoint is a regular file", "Mount over existing file" and "Remove export": the
/// export shows the image's data, is mode 0400 when read-only and refuses chmod (read-only
/// file system); a second export (`-U`) over the image itself is read at the same time as the
/// first by `qemu-img compare`; `cp` copes with the EOF; when an export stops, its mountpoint
/// shows what was there before.
#[test]
fn file_mountpoint_read_only_export() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 64 << 20, 308);
    let mnt = dir.path().join("t.img.fuse");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["-r"]);
    assert_eq!(
        fstype_at(&mnt).as_deref(),
        Some("fuse.coro-fuse"),
        "fstype in mountinfo"
    );
    assert_eq!(
        statfs_type(&mnt).unwrap(),
        FUSE_SUPER_MAGIC,
        "statfs f_type"
    );

    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", &mnt, &img).ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");

    assert_eq!(file_mode(&mnt), 0o400, "read-only export mode");
    for m in ["u+w", "u+x"] {
        let out = sh!("chmod", m, &mnt).fails();
        assert!(
            out.stderr.contains("Read-only file system"),
            "chmod {m} on a read-only export: {out}"
        );
        assert_eq!(file_mode(&mnt), 0o400, "mode after chmod {m}");
    }

    // "Mount over existing file", while the first export is still there.
    let mut over = Export::start(&img, &img, &["-U"]);
    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", &mnt, &img).ok();
    assert!(
        out.stdout.contains("Images are identical"),
        "two exports compared: {out}"
    );
    let copy = dir.path().join("t.img.copy");
    sh!("cp", &img, &copy).ok();
    assert_same_bytes(&read_all(&copy), &data, "cp of the export over the image");
    over.stop_ok();

    // "Double export" is in cli.rs; "Remove export":
    let out = sh!("qemu-img", "info", "-f", "raw", "-U", &mnt).ok();
    assert!(
        out.stdout.contains("64 MiB (67108864 bytes)"),
        "qemu-img info on the export: {out}"
    );
    e.stop_ok();
    let out = sh!("qemu-img", "info", "-f", "raw", &mnt).ok();
    assert!(
        out.stdout.contains("0 B (0 bytes)"),
        "the mountpoint file is empty again: {out}"
    );
    assert_same_bytes(&read_all(&img), &data, "image after read-only exports");
}

/// 308 "Writable export": writes through a read-only export fail (with EROFS at open, since the
/// mount is `ro`), the image is unchanged.
#[test]
fn read_only_export_refuses_writes() {
    require!(
        fuse_available(),
        have_tools(&["qemu-io", "dd", "truncate", "fallocate"])
    );
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 4 << 20, 11);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--read-only"]);
    let p = e.path().to_path_buf();

    let err = fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect_err("open for writing must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "open(O_WRONLY) on a read-only export: {err}"
    );
    let out = sh!("qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", &p);
    let t = out.all();
    assert!(
        t.contains("Read-only file system") || t.contains("Permission denied"),
        "qemu-io write on a read-only export should fail: {out}"
    );
    let of = format!("of={}", p.display());
    let out = sh!(
        "dd",
        "if=/dev/zero",
        &of,
        "bs=4096",
        "count=1",
        "conv=notrunc"
    )
    .fails();
    assert!(out.stderr.contains("Read-only file system"), "{out}");
    sh!("truncate", "-s", "1M", &p).fails();
    sh!("fallocate", "-p", "-o", "0", "-l", "64K", &p).fails();
    assert_eq!(file_size(&p), 4 << 20);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image behind a read-only export");
}

/// A directory mountpoint (nbdfuse style, where QEMU refuses): the image appears inside it
/// under its own name, nothing else does.
#[test]
fn directory_mountpoint_shows_the_image_by_name() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("disk.raw");
    let mut data = random_image(&img, 3 << 20, 5);
    let mnt = dir.path().join("mntdir");
    fs::create_dir(&mnt).unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    assert_eq!(e.path(), mnt.join("disk.raw"));
    assert!(
        fs::metadata(&mnt).unwrap().is_dir(),
        "the mountpoint stays a directory"
    );
    let names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["disk.raw".to_string()], "directory listing");
    let err = fs::metadata(mnt.join("other")).expect_err("only the image is there");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert!(
        fs::File::create(mnt.join("new")).is_err(),
        "cannot create files in the export directory"
    );
    assert_eq!(file_mode(e.path()), 0o600, "writable export mode");
    assert_eq!(file_size(e.path()), 3 << 20);
    assert_same_bytes(
        &read_all(e.path()),
        &data,
        "data through the directory export",
    );

    let f = open_rw(e.path());
    f.write_all_at(&[0x5a; 1000], 12345).unwrap();
    f.sync_all().unwrap();
    drop(f);
    data[12345..13345].fill(0x5a);
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &data,
        "image after writing through the directory export",
    );
    assert_eq!(
        fs::read_dir(&mnt).unwrap().count(),
        0,
        "the mountpoint directory is empty again"
    );
}

/// 308 "Mount over existing file": the image exported onto its own path, then used through
/// `qemu-img`, `qemu-io`, `dd` and `cp` there.
#[test]
fn mount_over_the_image_itself() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io", "dd"]));
    let dir = workdir();
    let img = dir.path().join("self.img");
    let mut data = random_image(&img, 8 << 20, 30802);
    let reference = dir.path().join("reference.img");
    fs::write(&reference, &data).unwrap();
    let mut e = Export::start(&img, &img, NO_ARGS);
    assert_eq!(e.path(), img.as_path());
    assert_eq!(fstype_at(&img).as_deref(), Some("fuse.coro-fuse"));

    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", &img, &reference).ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");

    sh!("qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", &img).ok();
    data[1 << 20..(1 << 20) + (64 << 10)].fill(42);
    let of = format!("of={}", img.display());
    sh!(
        "dd",
        "if=/dev/zero",
        &of,
        "bs=4096",
        "count=3",
        "seek=512",
        "conv=notrunc,fsync"
    )
    .ok();
    data[2 << 20..(2 << 20) + 3 * 4096].fill(0);

    let copy = dir.path().join("copy.img");
    sh!("cp", &img, &copy).ok();
    assert_same_bytes(&read_all(&copy), &data, "cp of the export over the image");
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &data,
        "the image itself after the export stopped",
    );
}

/// 308 "Writable export": `qemu-io write` through the export lands in the image.
#[test]
fn writable_export_takes_qemu_io_writes() {
    require!(fuse_available(), have_tools(&["qemu-io", "qemu-img"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let mut data = random_image(&img, 8 << 20, 30803);
    let copy = dir.path().join("t.img.copy");
    fs::write(&copy, &data).unwrap();
    let mnt = dir.path().join("t.img.fuse");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    assert_eq!(file_mode(&mnt), 0o600, "writable export mode");
    for f in [&mnt, &copy] {
        let out = sh!("qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", f).ok();
        assert!(
            out.stdout
                .contains("wrote 65536/65536 bytes at offset 1048576"),
            "{out}"
        );
    }
    data[1 << 20..(1 << 20) + (64 << 10)].fill(42);
    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", &mnt, &copy).ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after qemu-io writes");
}
