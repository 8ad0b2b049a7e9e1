//! qcow2 read-side features through a real mount: backing chains (read, `qemu-img compare`,
//! relative backing names with coro-fuse started elsewhere), SEEK_DATA/SEEK_HOLE from block
//! status through the chain, broken chains refused at start, and the first-sector guard of a
//! probed raw image (`-f auto`) against `dd` of a qcow2 header.
//!
//! The qcow2 exports are read-only (`-r`): writable qcow2 is another branch's work.

use std::fs;
use std::path::{Path, PathBuf};

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// `qemu-img ARGS…` run in `dir`, so relative backing names stay relative.
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

/// A raw base (4 MiB, data in [0, 1 MiB)) under a qcow2 top (64 KiB clusters, 6 MiB, -F raw):
/// top data at 2 MiB, a zero cluster at 512 KiB over base data, the rest unallocated; the top
/// is larger than the base. Backing name relative. Returns the top's path.
fn make_chain(dir: &Path) -> PathBuf {
    qemu_img_in(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_io("raw", &dir.join("base.raw"), &["write -P 0x11 0 1M"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("top.qcow2"),
        &["write -P 0x22 2M 64k", "write -z 512k 64k"],
    );
    dir.join("top.qcow2")
}

fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    let mnt = dir.join(name);
    fs::write(&mnt, b"").unwrap();
    mnt
}

/// Checks SEEK_DATA and SEEK_HOLE on the mounted file at the edges of every extent against
/// `qemu-img map` of the image.
fn check_seek(mounted: &Path, img: &Path, size: u64) {
    let extents = qemu_img_data_extents(img, false);
    assert!(!extents.is_empty(), "the layout has data");
    assert_seek_matches(mounted, &extents, size, "");
}

/// A chain read through the export equals `qemu-img convert` and `qemu-img compare` of the
/// image; SEEK_DATA/SEEK_HOLE follow the chain: base data under unallocated top clusters is
/// data, a zero cluster over it and everything past the base's end are holes.
#[test]
fn backing_chain_reads_and_seeks_like_qemu() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    if !supports_holes(dir.path()) {
        skip(&format!("{} has no holes", dir.path().display()));
        return;
    }
    let top = make_chain(dir.path());
    let oracle = dir.path().join("oracle.raw");
    sh!("qemu-img", "convert", "-O", "raw", &top, &oracle).ok();
    let mnt = mountpoint(dir.path(), "mnt");
    let mut e = Export::start(&top, &mnt, &["-r"]);
    assert_eq!(file_size(e.path()), 6 * MIB);
    assert_same_bytes(
        &read_all(e.path()),
        &read_all(&oracle),
        "chain through the export",
    );
    let out = sh!(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "-U",
        e.path(),
        &top
    )
    .ok();
    assert!(out.stdout.contains("identical"), "{out}");

    // The layout, spelled out, then checked edge by edge against qemu-img map.
    let f = fs::File::open(e.path()).unwrap();
    assert_eq!(seek_data(&f, 0).unwrap(), 0, "base data under the top");
    assert_eq!(
        seek_hole(&f, 0).unwrap(),
        512 * KIB,
        "the zero cluster is a hole"
    );
    assert_eq!(
        seek_data(&f, 512 * KIB).unwrap(),
        576 * KIB,
        "base data again"
    );
    assert_eq!(
        seek_hole(&f, 576 * KIB).unwrap(),
        MIB,
        "base hole below unallocated"
    );
    assert_eq!(seek_data(&f, MIB).unwrap(), 2 * MIB, "top data");
    assert_eq!(seek_hole(&f, 2 * MIB).unwrap(), 2 * MIB + 64 * KIB);
    assert_eq!(
        seek_data(&f, 4 * MIB).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENXIO)),
        "past the base's end: no data to EOF"
    );
    drop(f);
    check_seek(e.path(), &top, 6 * MIB);
    e.stop_ok();
}

/// Without a backing file, unallocated and zero clusters are holes.
#[test]
fn seek_on_a_standalone_qcow2() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    let img = dir.path().join("alone.qcow2");
    create_qcow2(&img, "cluster_size=4096", "4M");
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x31 64k 8k",
            "write -z 80k 4k",
            "write -P 0x32 84k 4k",
            "write -c -P 0x33 3M 64k",
        ],
    );
    let mnt = mountpoint(dir.path(), "mnt");
    let mut e = Export::start(&img, &mnt, &["-r"]);
    let f = fs::File::open(e.path()).unwrap();
    assert_eq!(seek_data(&f, 0).unwrap(), 64 * KIB);
    assert_eq!(seek_hole(&f, 64 * KIB).unwrap(), 72 * KIB);
    assert_eq!(
        seek_data(&f, 72 * KIB).unwrap(),
        84 * KIB,
        "zero cluster skipped"
    );
    drop(f);
    check_seek(e.path(), &img, 4 * MIB);
    e.stop_ok();
}

/// coro-fuse started in another directory, with the image path relative to it: the backing
/// names resolve against the image's directory.
#[test]
fn relative_backing_names_from_another_cwd() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    let images = dir.path().join("images");
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&images).unwrap();
    fs::create_dir(&elsewhere).unwrap();
    let top = make_chain(&images);
    let oracle = dir.path().join("oracle.raw");
    sh!("qemu-img", "convert", "-O", "raw", &top, &oracle).ok();
    let mnt = mountpoint(dir.path(), "mnt");
    let rel_image = Path::new("../images/top.qcow2");
    let mut e = Export::try_start_in(Some(&elsewhere), rel_image, &mnt, &["-r"])
        .unwrap_or_else(|x| panic!("export with a relative image path: {x}"));
    assert_same_bytes(&read_all(e.path()), &read_all(&oracle), "relative chain");
    e.stop_ok();
}

/// A chain whose backing file is missing, or whose raw backing file has no stated format, is
/// refused at start with the files named.
#[test]
fn broken_chains_are_refused_at_start() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    let top = make_chain(dir.path());
    fs::rename(dir.path().join("base.raw"), dir.path().join("gone.raw")).unwrap();
    let mnt = mountpoint(dir.path(), "mnt");
    let x = Export::try_start(&top, &mnt, &["-r"])
        .err()
        .expect("a missing backing file is refused");
    assert_eq!(x.code(), Some(1), "{x}");
    assert!(
        x.stderr.contains("top.qcow2") && x.stderr.contains("base.raw': no such file"),
        "{x}"
    );
    // Backing format removed (probing would say raw): refused with the remedy.
    fs::rename(dir.path().join("gone.raw"), dir.path().join("base.raw")).unwrap();
    qemu_img_in(
        dir.path(),
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "t2.qcow2", "6M",
        ],
    );
    patch_backing_format_away(&dir.path().join("t2.qcow2"));
    let x = Export::try_start(&dir.path().join("t2.qcow2"), &mnt, &["-r"])
        .err()
        .expect("a probed raw backing file is refused");
    assert!(
        x.stderr
            .contains("probing it as raw is refused: rebase with -F raw"),
        "{x}"
    );
}

/// Renames the backing format extension (0xe2792aca) to an unknown type, as if `-F` had never
/// been given.
fn patch_backing_format_away(img: &Path) {
    use std::os::unix::fs::FileExt;
    let bytes = fs::read(img).unwrap();
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == magic)
        .expect("a backing format extension");
    let f = fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&0x7777_7777u32.to_be_bytes(), at as u64)
        .unwrap();
}

/// `dd` of a qcow2 header onto sector 0 of a raw image exported with `-f auto` fails with
/// EPERM and leaves the image alone; with `-f raw` it is an ordinary write.
#[test]
fn probed_raw_export_refuses_a_qcow2_header_in_sector_zero() {
    require!(fuse_available(), have_tools(&["qemu-img", "dd"]));
    let dir = workdir();
    let img = dir.path().join("disk.raw");
    fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let donor = dir.path().join("donor.qcow2");
    sh!("qemu-img", "create", "-q", "-f", "qcow2", &donor, "1M").ok();
    let header = dir.path().join("header.bin");
    fs::write(&header, &fs::read(&donor).unwrap()[..512]).unwrap();
    let mnt = mountpoint(dir.path(), "mnt");

    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let of = format!("of={}", e.path().display());
    let iff = format!("if={}", header.display());
    let out = sh!("dd", &iff, &of, "bs=512", "count=1", "conv=notrunc,fsync");
    assert!(!out.success(), "dd must fail: {out}");
    assert!(out.stderr.contains("Operation not permitted"), "{out}");
    // Elsewhere the same bytes are just data.
    sh!(
        "dd",
        &iff,
        &of,
        "bs=512",
        "count=1",
        "seek=1",
        "conv=notrunc,fsync"
    )
    .ok();
    e.stop_ok();
    let bytes = fs::read(&img).unwrap();
    assert!(bytes[..512].iter().all(|&b| b == 0), "sector 0 unchanged");
    assert_eq!(&bytes[512..516], b"QFI\xfb");

    let mut e = Export::start(&img, &mnt, &["-f", "raw"]);
    let of = format!("of={}", e.path().display());
    sh!("dd", &iff, &of, "bs=512", "count=1", "conv=notrunc,fsync").ok();
    e.stop_ok();
    assert_eq!(&fs::read(&img).unwrap()[..4], b"QFI\xfb", "-f raw: written");
}
