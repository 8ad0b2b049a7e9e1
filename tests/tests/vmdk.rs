//! vmdk images through a real mount: every subformat `qemu-img` makes (monolithicSparse,
//! monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized) exported with
//! `-r` reads as `qemu-img convert -O raw` writes it (`cmp`), SEEK_DATA/SEEK_HOLE agree with
//! `qemu-img map`; `--snapshot` takes writes and leaves every vmdk file byte for byte
//! unchanged; a writable export without `-r` or `--snapshot` is refused at start, naming both.
//!
//! Oracles: `qemu-img convert -O raw`, `qemu-img map --output=json`, checksums of the files.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tests::*;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

fn qemu_img_in(dir: &Path, args: &[&str]) {
    let mut c = tool("qemu-img");
    c.current_dir(dir).args(args);
    run(&mut c).ok();
}

fn qemu_io(format: &str, img: &Path, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(img)).ok();
}

fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let mnt = dir.join(name);
    fs::write(&mnt, b"").unwrap();
    mnt
}

/// `disk.vmdk` of `subformat` and `size` in `dir`, with data written by qemu-io (across grains
/// and grain tables, an unaligned tail, across the 2 GiB extent boundary when there is one);
/// streamOptimized is converted from such a raw image, as it cannot be written in place.
fn make(dir: &Path, subformat: &str, size: u64) -> PathBuf {
    let mut writes = vec![
        "write -P 0x11 0 4096".to_owned(),
        "write -P 0x12 100000 200000".into(),
        format!("write -P 0x13 {} 131072", 32 * MIB - 65536),
        format!("write -P 0x14 {} 1536", size - 2048),
    ];
    if size > 2 * GIB {
        writes.push(format!("write -P 0x15 {} 1M", 2 * GIB - 512 * 1024));
    }
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    let size_arg = size.to_string();
    if subformat == "streamOptimized" {
        qemu_img_in(dir, &["create", "-q", "-f", "raw", "src.raw", &size_arg]);
        qemu_io("raw", &dir.join("src.raw"), &writes);
        qemu_img_in(
            dir,
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "src.raw",
                "disk.vmdk",
            ],
        );
        fs::remove_file(dir.join("src.raw")).unwrap();
    } else {
        let opts = format!("subformat={subformat}");
        qemu_img_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &opts,
                "disk.vmdk",
                &size_arg,
            ],
        );
        qemu_io("vmdk", &dir.join("disk.vmdk"), &writes);
    }
    dir.join("disk.vmdk")
}

/// SEEK_DATA and SEEK_HOLE on the mounted file at the edges of every data extent.
fn check_seek(mounted: &Path, img: &Path, size: u64) {
    let extents = qemu_img_data_extents(img, true);
    assert!(!extents.is_empty(), "the layout has data");
    assert_seek_matches(mounted, &extents, size, "");
}

fn exported_subformat_matches_qemu(subformat: &str, size: u64) {
    require!(
        fuse_available(),
        have_tools(&["qemu-img", "qemu-io", "cmp"])
    );
    // On disk: the 2 GiB extents are sparse files, and SEEK_HOLE must see their holes.
    let dir = disk_workdir();
    let img = make(dir.path(), subformat, size);
    let raw = dir.path().join("oracle.raw");
    run(tool("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&raw))
    .ok();
    let mnt = mountpoint(dir.path(), "mnt");
    let mut e = Export::start(&img, &mnt, &["-r"]);
    assert_eq!(fs::metadata(e.path()).unwrap().len(), size);
    run(tool("cmp").arg(e.path()).arg(&raw)).ok();
    check_seek(e.path(), &img, size);
    e.stop_ok();
}

#[test]
fn monolithic_sparse_exports_as_qemu_reads_it() {
    exported_subformat_matches_qemu("monolithicSparse", 40 * MIB + 1536);
}

#[test]
fn monolithic_flat_exports_as_qemu_reads_it() {
    exported_subformat_matches_qemu("monolithicFlat", 40 * MIB + 1536);
}

#[test]
fn stream_optimized_exports_as_qemu_reads_it() {
    exported_subformat_matches_qemu("streamOptimized", 40 * MIB + 1536);
}

#[test]
fn two_gb_max_extent_sparse_exports_as_qemu_reads_it() {
    exported_subformat_matches_qemu("twoGbMaxExtentSparse", 2 * GIB + 4 * MIB);
}

#[test]
fn two_gb_max_extent_flat_exports_as_qemu_reads_it() {
    exported_subformat_matches_qemu("twoGbMaxExtentFlat", 2 * GIB + 4 * MIB);
}

/// Every file of the image (descriptor and extents) with its bytes.
fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".vmdk"))
        .map(|p| {
            let bytes = read_all(&p);
            (p, bytes)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn snapshot_takes_writes_and_leaves_the_vmdk_files_unchanged() {
    require!(
        fuse_available(),
        have_tools(&["qemu-img", "qemu-io", "cmp"])
    );
    for subformat in ["monolithicSparse", "twoGbMaxExtentFlat", "streamOptimized"] {
        let dir = workdir();
        let img = make(dir.path(), subformat, 40 * MIB);
        let before = files_of(dir.path());
        assert!(!before.is_empty());
        let mnt = mountpoint(dir.path(), "mnt");
        let mut e = Export::start(&img, &mnt, &["--snapshot"]);
        let shown = "vmdk + qcow2 overlay";
        wait_until(std::time::Duration::from_secs(5), || {
            e.stdout().contains(shown)
        });
        assert!(e.stdout().contains(shown), "{}", e.logs());
        let mut want = read_all(e.path());
        let f = open_rw(e.path());
        for (off, len, seed) in [
            (0u64, 4096usize, 1u64),
            (65536 - 100, 300, 2),
            (5 * MIB, 200_000, 3),
        ] {
            let data = random_bytes(seed, len);
            f.write_all_at(&data, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        drop(f);
        assert_same_bytes(&read_all(e.path()), &want, "reads see the writes");
        e.stop_ok();
        assert!(
            files_of(dir.path()) == before,
            "{subformat}: the vmdk files are byte-for-byte unchanged"
        );
    }
}

#[test]
fn a_writable_export_is_refused_with_the_remedies() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    qemu_img_in(
        dir.path(),
        &["create", "-q", "-f", "vmdk", "disk.vmdk", "8M"],
    );
    let img = dir.path().join("disk.vmdk");
    let before = read_all(&img);
    let mnt = mountpoint(dir.path(), "mnt");
    for args in [&[][..], &["-f", "vmdk"][..]] {
        let x = Export::try_start(&img, &mnt, args)
            .err()
            .expect("a writable vmdk export is refused");
        assert_eq!(x.code(), Some(1), "{x}");
        assert!(
            x.stderr.contains("disk.vmdk")
                && x.stderr.contains("-r")
                && x.stderr.contains("--snapshot"),
            "{x}"
        );
    }
    assert!(read_all(&img) == before, "the image is untouched");
    // With -r it starts, and the file is read-only.
    let mut e = Export::start(&img, &mnt, &["-r"]);
    let err = fs::OpenOptions::new()
        .write(true)
        .open(e.path())
        .expect_err("a read-only export");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EACCES | libc::EROFS)),
        "{err}"
    );
    e.stop_ok();
}
