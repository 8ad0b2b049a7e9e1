//! `--snapshot` and `--overlay FILE`: the image is untouched (byte for byte), every write goes
//! to a qcow2 overlay; a temporary one is gone after any exit (SIGKILL too), a kept one is
//! accepted by `qemu-img info`/`check`/`compare`, survives a restart and a SIGKILL after fsync,
//! and `qemu-img commit` folds it back. Over raw and qcow2 images. Errors: an existing overlay
//! of another image, a file that is not qcow2, conflicting options.
//!
//! Oracle: a model of the bytes written (`want`), compared with what the mount reads and with
//! `qemu-img convert -O raw` of the overlay or of the committed image.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tests::*;

/// The image in `fmt` ("raw" or "qcow2"), 8 MiB of seeded random data; returns (image, data).
fn image(dir: &Path, fmt: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("data.raw");
    let data = random_image(&raw, 8 << 20, seed);
    if fmt == "raw" {
        let img = dir.join("disk.raw");
        fs::rename(&raw, &img).unwrap();
        return (img, data);
    }
    let img = dir.join("disk.qcow2");
    run(tool("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img))
    .ok();
    fs::remove_file(&raw).unwrap();
    (img, data)
}

/// Writes through the mount (unaligned, across a cluster, at the end) into `want` too.
fn write_some(e: &Export, want: &mut [u8], seed: u64) {
    let f = open_rw(e.path());
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (65536 - 100, 300),
        (3 << 20, 200_000),
        ((8 << 20) - 512, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_bytes(seed + i as u64, len);
        f.write_all_at(&data, off).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
}

fn raw_of(path: &Path, fmt: &str) -> Vec<u8> {
    let out = path.with_extension("convert.raw");
    run(tool("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(path)
        .arg(&out))
    .ok();
    let bytes = read_all(&out);
    fs::remove_file(&out).unwrap();
    bytes
}

fn start_with_tmpdir(img: &Path, mnt: &Path, args: &[&str], tmp: &Path) -> Export {
    let tmp = tmp.to_owned();
    match Export::try_start_with(None, img, mnt, args, |c| {
        c.env("TMPDIR", &tmp);
    }) {
        Ok(e) => e,
        Err(x) => panic!("export did not start: {x}"),
    }
}

fn snapshot_leaves_the_image_untouched(fmt: &str) {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let (img, data) = image(dir.path(), fmt, 7);
    let before = read_all(&img);
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = start_with_tmpdir(&img, &mnt, &["--snapshot"], &tmp);
    // The mounted line is printed just after the mount appears: wait for it.
    let shown = format!("{fmt} + qcow2 overlay");
    wait_until(std::time::Duration::from_secs(5), || {
        e.stdout().contains(&shown)
    });
    assert!(
        e.stdout().contains(&shown) && e.stderr().contains("--snapshot"),
        "the log says where writes go:\n{}",
        e.logs()
    );
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "the temporary overlay is unlinked once open"
    );
    let mut want = data.clone();
    write_some(&e, &mut want, 100);
    assert_same_bytes(&read_all(e.path()), &want, "reads see the writes");
    // Another reader may open the image while the snapshot export runs (read lock only).
    run(tool("qemu-img").args(["info"]).arg(&img)).ok();
    e.stop_ok();
    assert!(
        read_all(&img) == before,
        "the image is byte-for-byte untouched"
    );
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "nothing left in $TMPDIR"
    );

    // SIGKILL leaves nothing behind either, and the image is still untouched.
    let mut e = start_with_tmpdir(&img, &mnt, &["--snapshot"], &tmp);
    write_some(&e, &mut data.clone(), 200);
    e.stop_with(libc::SIGKILL);
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "nothing left after SIGKILL"
    );
    assert!(wait_image_unlocked(&img, std::time::Duration::from_secs(5)));
    assert!(read_all(&img) == before, "untouched after SIGKILL");
}

#[test]
fn snapshot_of_raw() {
    snapshot_leaves_the_image_untouched("raw");
}

#[test]
fn snapshot_of_qcow2() {
    snapshot_leaves_the_image_untouched("qcow2");
}

fn overlay_is_a_qemu_overlay_and_commits(fmt: &str) {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let (img, data) = image(dir.path(), fmt, 11);
    let before = read_all(&img);
    let ov = dir.path().join("ov.qcow2");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let ov_arg = ov.to_str().unwrap().to_owned();
    let mut e = Export::start(&img, &mnt, &["--overlay", &ov_arg]);
    assert!(e.stderr().contains("the new overlay"), "{}", e.logs());
    let mut want = data.clone();
    write_some(&e, &mut want, 300);
    e.stop_ok();
    assert!(read_all(&img) == before, "the image is untouched");

    let info = run(tool("qemu-img").args(["info", "--output=json"]).arg(&ov))
        .ok()
        .stdout;
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(
        info.contains(&format!("\"backing-filename-format\": \"{fmt}\"")),
        "the backing format is recorded: {info}"
    );
    assert!(
        info.contains(&abs_path(&img).display().to_string()),
        "the backing file is the image by absolute path: {info}"
    );
    assert_eq!(
        qemu_img_check(&ov).code(),
        Some(0),
        "qemu-img check is clean"
    );
    assert_same_bytes(&raw_of(&ov, "qcow2"), &want, "qemu-img reads the overlay");

    // A restart with the same overlay shows the writes and takes more.
    let mut e = Export::start(&img, &mnt, &["--overlay", &ov_arg]);
    assert!(e.stderr().contains("the existing overlay"), "{}", e.logs());
    assert_same_bytes(&read_all(e.path()), &want, "the restart shows the writes");
    write_some(&e, &mut want, 400);
    // SIGKILL after fsync: what was fsync'ed is kept.
    e.stop_with(libc::SIGKILL);
    assert!(wait_image_unlocked(&ov, std::time::Duration::from_secs(5)));
    let check = qemu_img_check(&ov);
    assert!(
        matches!(check.code(), Some(0 | 3)),
        "no corruption after SIGKILL (leaks allowed): {}",
        check.all()
    );
    assert_same_bytes(
        &raw_of(&ov, "qcow2"),
        &want,
        "fsync'ed writes survive SIGKILL",
    );
    let expect = dir.path().join("expect.raw");
    fs::write(&expect, &want).unwrap();
    run(tool("qemu-img").arg("compare").arg(&ov).arg(&expect)).ok();
    assert!(read_all(&img) == before, "still untouched");

    // qemu-img commit folds the overlay back into the image.
    run(tool("qemu-img").arg("commit").arg(&ov)).ok();
    assert_same_bytes(&raw_of(&img, fmt), &want, "the committed image");
}

#[test]
fn overlay_over_raw() {
    overlay_is_a_qemu_overlay_and_commits("raw");
}

#[test]
fn overlay_over_qcow2() {
    overlay_is_a_qemu_overlay_and_commits("qcow2");
}

#[test]
fn overlay_of_another_image_or_not_qcow2_is_refused() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let (img, _) = image(dir.path(), "raw", 3);
    let other = dir.path().join("other.raw");
    sparse_image(&other, 8 << 20);
    let ov = dir.path().join("ov.qcow2");
    run(tool("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&other)
        .arg(&ov))
    .ok();
    let ov_before = read_all(&ov);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let img_s = img.to_str().unwrap();
    let mnt_s = mnt.to_str().unwrap();
    let out = coro_fuse_expect_exit(
        &["--overlay", ov.to_str().unwrap(), img_s, mnt_s],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("has backing file") && out.stderr.contains("other.raw"),
        "the error names the overlay's backing file: {}",
        out.stderr
    );
    assert!(
        read_all(&ov) == ov_before,
        "the refused overlay is untouched"
    );

    let plain = dir.path().join("plain.img");
    fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let out = coro_fuse_expect_exit(
        &["--overlay", plain.to_str().unwrap(), img_s, mnt_s],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("is not a qcow2 image"),
        "{}",
        out.stderr
    );

    // A qcow2 overlay made by qemu-img over this image, by a relative name, is accepted.
    let good = dir.path().join("good.qcow2");
    run(tool("qemu-img").current_dir(dir.path()).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "disk.raw",
        "good.qcow2",
    ]))
    .ok();
    let good_s = good.to_str().unwrap().to_owned();
    let e = Export::start(&img, &mnt, &["--overlay", &good_s]);
    assert_eq!(file_size(e.path()), 8 << 20);
    drop(e);

    // An image that is a directory.
    let out = coro_fuse_expect_exit(
        &["--snapshot", dir.path().to_str().unwrap(), mnt_s],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(out.stderr.contains("is a directory"), "{}", out.stderr);
}

#[test]
fn overlay_options_that_conflict_are_usage_errors() {
    let dir = workdir();
    let img = dir.path().join("disk.raw");
    sparse_image(&img, 1 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let (i, m) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    for args in [
        vec!["--snapshot", "-r"],
        vec!["--snapshot", "--overlay", "x.qcow2"],
        vec!["--snapshot", "--create", "1M"],
        vec!["--snapshot", "--offset", "512"],
        vec!["--overlay", "x.qcow2", "--size", "512"],
        vec!["--snapshot", "-f", "null"],
    ] {
        let mut all = args.clone();
        all.extend([i, m]);
        let out = coro_fuse_expect_exit(&all, Some(&mnt));
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.all());
    }
    let help = run(coro_fuse().arg("--help")).ok().stdout;
    assert!(
        help.contains("--snapshot") && help.contains("--overlay <FILE>"),
        "{help}"
    );
}

#[test]
fn snapshot_with_force_share_is_writable_over_a_locked_image() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    let (img, data) = image(dir.path(), "qcow2", 5);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    // A writer holds the image (as a running VM would): plain --snapshot is refused ...
    let holder = dir.path().join("holder.mnt");
    fs::write(&holder, b"").unwrap();
    let writer = Export::start(&img, &holder, &[] as &[&str]);
    let (i, m) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    let out = coro_fuse_expect_exit(&["--snapshot", i, m], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(out.stderr.contains("locked"), "{}", out.stderr);
    // ... with -U it starts, and its writes go to the overlay only.
    let mut e = Export::start(&img, &mnt, &["--snapshot", "-U"]);
    let mut want = data.clone();
    write_some(&e, &mut want, 500);
    assert_same_bytes(&read_all(e.path()), &want, "reads see the writes");
    e.stop_ok();
    drop(writer);
    assert_same_bytes(
        &raw_of(&img, "qcow2"),
        &data,
        "the image's data is untouched",
    );
}
