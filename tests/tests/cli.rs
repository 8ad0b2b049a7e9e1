//! The command line: help, usage errors (exit 2), start-up errors (exit 1: image, mountpoint,
//! locks), `--create`, `-U`.
//!
//! QEMU: the error cases of `tests/qemu-iotests/308` ("Mountpoint not present", "Double
//! export") and qemu's image locking.

use std::fs;
use std::path::Path;

use tests::*;

fn args(v: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    v.iter().map(|a| a.as_ref().to_os_string()).collect()
}

#[test]
fn help_exits_0() {
    let out = run(coro_fuse().arg("--help")).ok();
    let text = out.stdout.to_lowercase();
    for word in [
        "usage",
        "--read-only",
        "--growable",
        "--allow-other",
        "--create",
        "--offset",
    ] {
        assert!(text.contains(word), "--help should mention {word}: {out}");
    }
    run(coro_fuse().arg("--version")).ok();
}

#[test]
fn usage_errors_exit_2() {
    let dir = workdir();
    let img = dir.path().join("a.img");
    sparse_image(&img, 1 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let bad: Vec<Vec<std::ffi::OsString>> = vec![
        vec![],
        args(&[&img]),
        args(&[&"--no-such-option", &img, &mnt]),
        args(&[&"--size", &"1X", &img, &mnt]),
        args(&[&"--offset", &"ten", &img, &mnt]),
        args(&[&"-f", &"qcow9", &img, &mnt]),
        args(&[&"--allow-other", &"maybe", &img, &mnt]),
        args(&[&"--cache", &"sometimes", &img, &mnt]),
        args(&[&"-r", &"--growable", &img, &mnt]),
        args(&[&"-U", &"--growable", &img, &mnt]),
        args(&[&img, &mnt, &"extra"]),
        args(&[&"--max-request", &"3K", &img, &mnt]),
        args(&[&"--max-request", &"2M", &img, &mnt]),
    ];
    for a in bad {
        let out = coro_fuse_expect_exit(&a, Some(&mnt));
        assert_eq!(out.code(), Some(2), "usage error should exit 2: {out}");
        assert!(
            !out.stderr.trim().is_empty(),
            "usage error should say why: {out}"
        );
    }
    assert_eq!(fuse_mounts_at(&mnt), 0);
}

/// 308 "Mountpoint not present".
#[test]
fn missing_mountpoint_is_refused() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("a.img");
    sparse_image(&img, 1 << 20);
    let mnt = dir.path().join("no-such-mountpoint");
    let out = coro_fuse_expect_exit(&[arg(&img), arg(&mnt)], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("no-such-mountpoint"),
        "error should name the mountpoint: {out}"
    );
    let e = out.stderr.to_lowercase();
    assert!(
        e.contains("does not exist") || e.contains("no such file"),
        "error should say the mountpoint is missing: {out}"
    );
    assert!(!mnt.exists(), "a missing mountpoint must not be created");
}

#[test]
fn missing_image_is_refused() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("no-such.img");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let out = coro_fuse_expect_exit(&[arg(&img), arg(&mnt)], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("no-such.img"),
        "error should name the image: {out}"
    );
    assert!(
        !img.exists(),
        "without --create the image must not be created"
    );
    assert_eq!(fuse_mounts_at(&mnt), 0);
}

#[test]
fn image_that_is_a_directory_is_refused() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("imgdir");
    fs::create_dir(&img).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let out = coro_fuse_expect_exit(&[arg(&img), arg(&mnt)], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("directory"),
        "error should say why: {out}"
    );
    assert_eq!(fuse_mounts_at(&mnt), 0);
}

/// 308 "Double export": a mountpoint that already is a FUSE export is refused with a clear
/// message, and the first export keeps working.
#[test]
fn mountpoint_already_exported_is_refused() {
    require!(fuse_available());
    let dir = workdir();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let data = random_image(&a, 1 << 20, 1);
    sparse_image(&b, 1 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let first = Export::start(&a, &mnt, &["-r"]);
    let out = coro_fuse_expect_exit(&[arg(&b), arg(&mnt)], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("already a FUSE mount"),
        "error should say the mountpoint is already a FUSE mount: {out}"
    );
    assert_eq!(fuse_mounts_at(&mnt), 1, "exactly one mount must remain");
    assert_same_bytes(
        &read_all(first.path()),
        &data,
        "first export after the refused second",
    );
}

#[test]
fn create_makes_a_sparse_image() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("new.img");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--create", "64M"]);
    assert_eq!(file_size(e.path()), 64 << 20, "export size");
    assert_eq!(file_size(&img), 64 << 20, "image size");
    assert!(
        allocated(&img) <= 1 << 20,
        "--create should make a sparse image: {} bytes allocated",
        allocated(&img)
    );
    // Writable by default: write something and find it in the image.
    std::os::unix::fs::FileExt::write_all_at(&open_rw(e.path()), b"hello", 5 << 20).unwrap();
    e.stop_ok();
    let got = read_all(&img);
    assert_eq!(got.len(), 64 << 20);
    assert_eq!(&got[5 << 20..(5 << 20) + 5], b"hello");

    // --create on an existing image keeps it as it is.
    let mut e = Export::start(&img, &mnt, &["--create", "1M"]);
    assert_eq!(
        file_size(e.path()),
        64 << 20,
        "--create must not resize an existing image"
    );
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &got,
        "image after --create on an existing file",
    );
}

fn write_pattern(path: &Path, offset: u64, byte: u8, len: usize) {
    let f = open_rw(path);
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![byte; len], offset).unwrap();
    f.sync_all().unwrap();
}

/// A second writer on the same image is refused because of the image lock; so is a second
/// read-only instance (it cannot share writes); `-U` (force share) may read.
#[test]
fn second_instance_is_locked_out_and_force_share_reads() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("a.img");
    random_image(&img, 4 << 20, 2);
    let (m1, m2) = (dir.path().join("m1"), dir.path().join("m2"));
    fs::write(&m1, b"").unwrap();
    fs::write(&m2, b"").unwrap();
    let mut first = Export::start(&img, &m1, NO_ARGS);
    write_pattern(first.path(), 1 << 20, 0xab, 4096);

    for extra in [&[][..], &["-r"][..]] {
        let mut a: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        a.push(arg(&img));
        a.push(arg(&m2));
        let out = coro_fuse_expect_exit(&a, Some(&m2));
        assert_eq!(
            out.code(),
            Some(1),
            "second instance {extra:?} should be refused: {out}"
        );
        assert!(
            out.stderr.contains("locked"),
            "the error should say the image is locked: {out}"
        );
        assert_eq!(fuse_mounts_at(&m2), 0);
    }

    let mut second = Export::start(&img, &m2, &["-U"]);
    assert_eq!(file_mode(second.path()), 0o400, "-U exports read-only");
    let got = read_all(second.path());
    assert_eq!(
        &got[1 << 20..(1 << 20) + 4096],
        &[0xab; 4096][..],
        "-U sees the first's writes"
    );
    assert!(
        fs::OpenOptions::new()
            .write(true)
            .open(second.path())
            .is_err(),
        "a -U export must not be writable"
    );
    second.stop_ok();
    first.stop_ok();
}

/// Relative IMAGE and MOUNTPOINT work (resolved against the working directory), and the
/// export unmounts cleanly from there.
#[test]
fn relative_paths_work() {
    require!(fuse_available());
    let dir = workdir();
    let data = random_image(&dir.path().join("rel.img"), 1 << 20, 12);
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(dir.path().join("sub/mnt"), b"").unwrap();
    let mut e = Export::try_start_in(
        Some(dir.path()),
        Path::new("rel.img"),
        Path::new("sub/mnt"),
        &["-r"],
    )
    .unwrap_or_else(|x| panic!("relative paths: {x}"));
    assert_eq!(e.path(), abs_path(&dir.path().join("sub/mnt")));
    assert_same_bytes(&read_all(e.path()), &data, "export with relative paths");
    e.stop_ok();
}
