//! `--create SIZE`: a qcow2 image for `-f qcow2` or a `.qcow2` name (as `qemu-img create -f
//! qcow2` makes it: `qemu-img check` clean, what was written through the mount read back by
//! `qemu-img convert`), a sparse raw image otherwise; either way opened as the format made, so
//! no probing warning. An unaligned qcow2 size is a usage error (exit 2); an existing image is
//! exported as it is.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tests::*;

const PROBING: &str = "probing guessed";

fn qemu_info(path: &Path) -> String {
    run(tool("qemu-img").args(["info", "--output=json"]).arg(path))
        .ok()
        .stdout
}

fn qemu_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("convert.raw");
    run(tool("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw))
    .ok();
    let bytes = read_all(&raw);
    fs::remove_file(&raw).unwrap();
    bytes
}

#[test]
fn create_qcow2_by_name_writes_through_the_mount() {
    require!(fuse_available(), have_tools(&["qemu-img", "dd"]));
    let dir = workdir();
    let img = dir.path().join("x.qcow2");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--create", "64M"]);
    assert_eq!(file_size(e.path()), 64 << 20, "export size");
    assert!(
        e.stderr().contains("qcow2") && !e.stderr().contains(PROBING),
        "a created image is not probed:\n{}",
        e.logs()
    );
    assert!(allocated(&img) <= 1 << 20, "a new qcow2 image is small");
    let mut want = vec![0u8; 64 << 20];
    // A raw-looking first sector too: an image we made is not a probed raw one.
    let head = b"QFI\xfb not really a header";
    want[..head.len()].copy_from_slice(head);
    want[(5 << 20)..(5 << 20) + 5].copy_from_slice(b"hello");
    let f = open_rw(e.path());
    f.write_all_at(head, 0).unwrap();
    f.write_all_at(b"hello", 5 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pat = dir.path().join("pat");
    fs::write(&pat, vec![0xa5u8; 3 << 20]).unwrap();
    run(tool("dd")
        .arg(format!("if={}", pat.display()))
        .arg(format!("of={}", e.path().display()))
        .args(["bs=1M", "seek=10", "conv=notrunc,fsync", "status=none"]))
    .ok();
    want[10 << 20..13 << 20].fill(0xa5);
    e.stop_ok();
    let check = qemu_img_check(&img);
    assert!(check.success(), "qemu-img check: {check}");
    let info = qemu_info(&img);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(info.contains("\"compat\": \"1.1\""), "{info}");
    assert!(info.contains("\"cluster-size\": 65536"), "{info}");
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    assert_same_bytes(
        &qemu_raw(&img),
        &want,
        "qemu-img convert of the created image",
    );

    // It exists now: exported as it is (and probed as qcow2), not recreated.
    let mut e = Export::start(&img, &mnt, &["--create", "1M"]);
    assert_eq!(
        file_size(e.path()),
        64 << 20,
        "--create must not touch an existing image"
    );
    assert!(e.stderr().contains("exists"), "{}", e.logs());
    e.stop_ok();
    assert_same_bytes(
        &qemu_raw(&img),
        &want,
        "after --create on an existing image",
    );
}

#[test]
fn create_raw_by_default_and_qcow2_when_asked() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();

    // x.img: raw, opened as raw — no warning, and sector 0 may look like qcow2.
    let img = dir.path().join("x.img");
    let mut e = Export::start(&img, &mnt, &["--create", "1M"]);
    assert!(!e.stderr().contains(PROBING), "{}", e.logs());
    assert!(e.stderr().contains("sparse raw"), "{}", e.logs());
    open_rw(e.path()).write_all_at(b"QFI\xfb", 0).unwrap();
    e.stop_ok();
    assert_eq!(file_size(&img), 1 << 20);
    assert_eq!(&read_all(&img)[..4], b"QFI\xfb");

    // -f qcow2 x2.img: qcow2 whatever the name.
    let img = dir.path().join("x2.img");
    let mut e = Export::start(&img, &mnt, &["-f", "qcow2", "--create", "1M"]);
    assert_eq!(file_size(e.path()), 1 << 20);
    assert!(!e.stderr().contains(PROBING), "{}", e.logs());
    open_rw(e.path()).write_all_at(b"data", 4096).unwrap();
    e.stop_ok();
    assert!(qemu_info(&img).contains("\"format\": \"qcow2\""));
    assert!(qemu_img_check(&img).success());
    assert_eq!(&qemu_raw(&img)[4096..4100], b"data");

    // -f raw wins over the name.
    let img = dir.path().join("r.qcow2");
    let mut e = Export::start(&img, &mnt, &["-f", "raw", "--create", "1M"]);
    e.stop_ok();
    assert!(qemu_info(&img).contains("\"format\": \"raw\""));
}

#[test]
fn create_qcow2_with_an_unaligned_size_is_a_usage_error() {
    let dir = workdir();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let img = dir.path().join("u.qcow2");
    let out = coro_fuse_expect_exit(
        &[
            "--create".as_ref(),
            "1000".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("multiple of 512"), "{out}");
    assert!(!img.exists(), "nothing is created");
    let img = dir.path().join("u.img");
    let out = coro_fuse_expect_exit(
        &[
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--create".as_ref(),
            "1000".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
        Some(&mnt),
    );
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(!img.exists(), "nothing is created");
}
