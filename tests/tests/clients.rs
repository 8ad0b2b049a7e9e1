//! Real clients on the export: `fio` with crc32c verification, `qemu-img bench` (308
//! "Multi-threading"), and a whole ext4 file system (`mkfs.ext4`, `losetup`, `mount`,
//! `e2fsck`).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use tests::*;

/// fio randwrite + crc32c verify, libaio, O_DIRECT, two jobs on disjoint halves.
#[test]
fn fio_randwrite_verifies() {
    require!(fuse_available(), have_tools(&["fio"]));
    let dir = workdir();
    let img = dir.path().join("fio.img");
    sparse_image(&img, 64 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let out = fio_randwrite_verify(dir.path(), &e, 32 << 20);
    eprintln!("{}", out.stdout);
    e.stop_ok();
}

/// 308 "Multi-threading": `qemu-img bench` (many reads in parallel) on a null export.
#[test]
fn qemu_img_bench_on_null_export() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(
        &dir.path().join("null"),
        &mnt,
        &["-f", "null", "--size", "1G"],
    );
    let out = sh!(
        "qemu-img", "bench", "-f", "raw", "-c", "20000", "-d", "64", "-s", "4096", "-S", "4096",
        &mnt
    );
    assert!(out.success(), "qemu-img bench failed\n{out}\n{}", e.logs());
    assert!(out.stdout.contains("Run completed"), "{out}");
    e.stop_ok();
}

fn random_files(root: &std::path::Path, seed: u64) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut rng = Prng::new(seed);
    let mut files = BTreeMap::new();
    fs::create_dir_all(root.join("sub/dir")).unwrap();
    for i in 0..24 {
        let len = match i % 4 {
            0 => rng.below(100) as usize,
            1 => rng.range(4000, 5000) as usize,
            2 => rng.range(100_000, 300_000) as usize,
            _ => rng.range(1 << 20, 2 << 20) as usize,
        };
        let rel = if i % 3 == 0 {
            PathBuf::from(format!("sub/dir/f{i}"))
        } else {
            PathBuf::from(format!("f{i}"))
        };
        let data = random_bytes(seed * 1000 + i, len);
        fs::write(root.join(&rel), &data).unwrap();
        files.insert(rel, data);
    }
    files
}

/// `mkfs.ext4` on the export, loop-mount it, write files, unmount, `e2fsck -fn` clean; then
/// the same file system, mounted from the image itself after the export stopped, has the
/// same files.
#[test]
fn ext4_on_the_export_survives_fsck() {
    require!(
        fuse_available(),
        is_root(),
        have_tools(&["mkfs.ext4", "e2fsck", "losetup", "mount", "umount"])
    );
    if !std::path::Path::new("/dev/loop-control").exists() {
        skip("no loop devices (/dev/loop-control)");
        return;
    }
    let dir = workdir();
    let img = dir.path().join("ext4.img");
    sparse_image(&img, 128 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let fsdir = dir.path().join("fs");
    fs::create_dir(&fsdir).unwrap();

    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let p = e.path().to_path_buf();
    sh!("mkfs.ext4", "-F", "-q", &p).ok();
    let files = {
        let lo = LoopDev::attach(&p);
        let mut m = FsMount::mount(&lo.dev, &fsdir, &["-t", "ext4"]);
        let files = random_files(&fsdir, 1);
        sh!("sync", "-f", fsdir.join("f1")).ok();
        for (rel, data) in &files {
            assert_same_bytes(
                &fs::read(fsdir.join(rel)).unwrap(),
                data,
                &format!("{rel:?} on the mounted fs"),
            );
        }
        m.umount();
        files
    };
    let out = sh!("e2fsck", "-fn", &p);
    assert!(
        out.success(),
        "e2fsck on the export is not clean\n{out}\n{}",
        e.logs()
    );
    e.stop_ok();

    let out = sh!("e2fsck", "-fn", &img);
    assert!(out.success(), "e2fsck on the image is not clean\n{out}");
    let lo = LoopDev::attach(&img);
    let mut m = FsMount::mount(&lo.dev, &fsdir, &["-t", "ext4", "-o", "ro"]);
    for (rel, data) in &files {
        assert_same_bytes(
            &fs::read(fsdir.join(rel)).unwrap(),
            data,
            &format!("{rel:?} read back from the image"),
        );
    }
    m.umount();
}
