//! qcow2 backing chains against the real `qemu-img`/`qemu-io`: chains of raw and qcow2 images
//! read through the driver must equal `qemu-img convert -O raw`, block status must agree with
//! `qemu-img map`, and every way a chain can be broken must fail at open with a message that
//! names the file.
//!
//! Needs `qemu-img` and `qemu-io` in PATH (else SKIPPED loudly; a failure when `CI=true`).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{
    open_image, BlockError, BlockStatus, FileDriver, FileOptions, Format, OpenOptions, Qcow2Driver,
};
use common::qemu::{
    at, check_map, find_extension, have_qemu, oracle_bytes, patch, qemu_img, qemu_io, read_all,
};
use common::{co, disk_dir};

const MIB: u64 = 1 << 20;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn open_err(path: &Path) -> BlockError {
    open_image(path, &ro()).expect_err("the chain must be refused")
}

/// raw base (6 MiB) ← qcow2 mid (8 MiB, -F raw) ← qcow2 top (12 MiB, -F qcow2), with data,
/// zero clusters and compressed data written on every layer; relative backing names.
fn make_chain(dir: &Path, cluster_size: u64) -> std::path::PathBuf {
    let cs = format!("cluster_size={cluster_size}");
    qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "6M"]);
    qemu_io(
        "raw",
        &at(dir, "base.raw"),
        &[
            "write -P 0x11 0 2M",
            "write -P 0x12 4M 1M",
            "write -P 0x13 5242880 4096",
        ],
    );
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "8M",
        ],
    );
    qemu_io(
        "qcow2",
        &at(dir, "mid.qcow2"),
        &[
            "write -P 0x21 1M 64k",
            "write -z 4M 256k",
            "write -P 0x22 7M 512k",
            "write -P 0x23 1536k 1000",
        ],
    );
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "12M",
        ],
    );
    qemu_io(
        "qcow2",
        &at(dir, "top.qcow2"),
        &[
            "write -P 0x31 0 4096",
            "write -z 64k 64k",
            "write -P 0x32 5M 1M",
            "write -c -P 0x33 10M 1M",
            "write -z 7M 4096",
        ],
    );
    at(dir, "top.qcow2")
}

fn chain_matches_qemu(cluster_size: u64) {
    let test = format!("chain_of_three cluster_size={cluster_size}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let top = make_chain(dir.path(), cluster_size);
    let blk = common::qemu::open_ro(&top);
    assert_eq!(blk.size(), 12 * MIB);
    let expected = oracle_bytes(&top);
    for seed in [1, 2] {
        assert!(
            read_all(&blk, seed) == expected,
            "{test}: bytes differ from qemu-img convert"
        );
    }
    check_map(&blk, &top);
    // Past the raw base's end (6 MiB) and the mid image's (8 MiB) the chain reads zeros.
    let b = blk.clone();
    co(move || {
        let (status, n) = b.co_block_status(8 * MIB, 2 * MIB).expect("status");
        assert_eq!((status, n), (BlockStatus::Zero, 2 * MIB));
    });
    blk.close().expect("close the chain");
}

#[test]
fn chain_of_three_64k() {
    chain_matches_qemu(65536);
}

#[test]
fn chain_of_three_4k() {
    chain_matches_qemu(4096);
}

#[test]
fn relative_backing_names_resolve_against_the_image_directory() {
    if !have_qemu("relative_backing_names_resolve_against_the_image_directory") {
        return;
    }
    let dir = disk_dir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let top = make_chain(&sub, 65536);
    let header = common::qemu::head(&top, 4096);
    assert!(
        header.windows(9).any(|w| w == b"mid.qcow2"),
        "the backing name is stored relative"
    );
    let expected = oracle_bytes(&top);
    // The test process runs in block/, not in sub/: the absolute image path must still find
    // "mid.qcow2" and "base.raw" next to it ...
    assert!(read_all(&common::qemu::open_ro(&top), 3) == expected);
    // ... and so must a path relative to the working directory.
    let cwd = std::env::current_dir().expect("cwd");
    if let Some(rel) = relative_to(&top, &cwd) {
        assert!(rel.is_relative());
        assert!(read_all(&common::qemu::open_ro(&rel), 4) == expected);
    }
}

/// `path` relative to `base` when `base` is a directory above a common ancestor of both.
fn relative_to(path: &Path, base: &Path) -> Option<std::path::PathBuf> {
    let mut up = std::path::PathBuf::new();
    let mut anc = base;
    loop {
        if let Ok(rest) = path.strip_prefix(anc) {
            return Some(up.join(rest));
        }
        up.push("..");
        anc = anc.parent()?;
    }
}

#[test]
fn probed_qcow2_backing_is_accepted_probed_raw_is_refused() {
    if !have_qemu("probed_qcow2_backing_is_accepted_probed_raw_is_refused") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    // qcow2 over qcow2, backing format extension removed: probing says qcow2, fine.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    qemu_io("qcow2", &at(d, "b.qcow2"), &["write -P 0x44 0 64k"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    );
    let ext = find_extension(&at(d, "t.qcow2"), EXT_BACKING_FORMAT).expect("has -F");
    patch(&at(d, "t.qcow2"), ext, &0x7777_7777u32.to_be_bytes());
    let blk = common::qemu::open_ro(&at(d, "t.qcow2"));
    assert!(read_all(&blk, 1) == oracle_bytes(&at(d, "t.qcow2")));
    drop(blk);

    // qcow2 over raw without a format: refused, the message says how to fix it.
    qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "tr.qcow2",
        ],
    );
    let ext = find_extension(&at(d, "tr.qcow2"), EXT_BACKING_FORMAT).expect("has -F");
    patch(&at(d, "tr.qcow2"), ext, &0x7777_7777u32.to_be_bytes());
    let e = open_err(&at(d, "tr.qcow2")).to_string();
    assert!(
        e.contains(
            "backing file format not given; probing it as raw is refused: rebase with -F raw"
        ),
        "{e}"
    );
    assert!(
        e.contains("tr.qcow2") && e.contains("r.raw"),
        "names both files: {e}"
    );

    // An explicit format the driver does not have is refused by name.
    let ext = find_extension(&at(d, "t.qcow2"), 0x7777_7777).expect("patched extension");
    patch(&at(d, "t.qcow2"), ext, &EXT_BACKING_FORMAT.to_be_bytes());
    patch(&at(d, "t.qcow2"), ext + 4, &3u32.to_be_bytes());
    patch(&at(d, "t.qcow2"), ext + 8, b"qed\0\0\0\0\0");
    let e = open_err(&at(d, "t.qcow2")).to_string();
    assert!(
        e.contains("backing file format 'qed' is not supported"),
        "{e}"
    );
}

#[test]
fn broken_chains_fail_with_the_file_named() {
    if !have_qemu("broken_chains_fail_with_the_file_named") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2",
        ],
    );

    // Missing backing file (two levels down): ENOENT, every image on the way named.
    std::fs::rename(at(d, "a.qcow2"), at(d, "a.moved")).expect("rename");
    let e = open_err(&at(d, "c.qcow2"));
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("c.qcow2") && msg.contains("b.qcow2"), "{msg}");
    assert!(msg.contains("a.qcow2': no such file"), "{msg}");

    // A directory where the backing file should be.
    std::fs::create_dir(at(d, "a.qcow2")).expect("mkdir");
    let msg = open_err(&at(d, "b.qcow2")).to_string();
    assert!(msg.contains("a.qcow2': is a directory"), "{msg}");
    std::fs::remove_dir(at(d, "a.qcow2")).expect("rmdir");
    std::fs::rename(at(d, "a.moved"), at(d, "a.qcow2")).expect("rename back");
    common::qemu::open_ro(&at(d, "c.qcow2"));

    // A loop: a's backing file is c (c → b → a → c), and an image that backs itself.
    qemu_img(
        d,
        &["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    let msg = open_err(&at(d, "c.qcow2")).to_string();
    assert!(msg.contains("loop") && msg.contains("c.qcow2"), "{msg}");
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
    qemu_img(
        d,
        &["rebase", "-u", "-b", "s.qcow2", "-F", "qcow2", "s.qcow2"],
    );
    let msg = open_err(&at(d, "s.qcow2")).to_string();
    assert!(msg.contains("loop") && msg.contains("s.qcow2"), "{msg}");

    // Qcow2Driver::open alone cannot find backing files and says so.
    let file = FileDriver::open(
        &at(d, "b.qcow2"),
        &FileOptions {
            read_only: true,
            ..FileOptions::default()
        },
    )
    .expect("open the file");
    let e = Qcow2Driver::open(Arc::new(file))
        .err()
        .expect("needs the chain");
    assert!(
        e.to_string().contains("has a backing file ('a.qcow2')"),
        "{e}"
    );
}

#[test]
fn chain_depth_is_limited() {
    if !have_qemu("chain_depth_is_limited") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    let depth = block::qcow2::MAX_CHAIN_DEPTH;
    qemu_img(d, &["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]);
    qemu_io("qcow2", &at(d, "l0.qcow2"), &["write -P 0x5a 0 4096"]);
    for i in 1..=depth + 1 {
        let (below, name) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        // -u: qemu-img need not open the whole (growing) chain each time.
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", &below, "-F", "qcow2", &name, "1M",
            ],
        );
    }
    // `depth` backing files below the top: fine, and the base's data shows through.
    let blk = common::qemu::open_ro(&at(d, &format!("l{depth}.qcow2")));
    let b = blk.clone();
    co(move || {
        let mut buf = [0u8; 4096];
        b.co_pread(0, &mut buf).expect("read through 16 layers");
        assert!(buf.iter().all(|&x| x == 0x5a));
        assert_eq!(
            b.co_block_status(0, MIB).expect("status"),
            (BlockStatus::Data, 65536),
            "one cluster"
        );
    });
    drop(blk);
    // One more is refused.
    let msg = open_err(&at(d, &format!("l{}.qcow2", depth + 1))).to_string();
    assert!(
        msg.contains("too deep") && msg.contains("l0.qcow2"),
        "{msg}"
    );
}

#[test]
fn backing_files_are_opened_read_only_with_shared_locks() {
    if !have_qemu("backing_files_are_opened_read_only_with_shared_locks") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let base_before = std::fs::read(at(d, "base.qcow2")).expect("read");
    let blk = common::qemu::open_ro(&at(d, "top.qcow2"));
    // A writer of the base is refused while we read through it; a reader is not.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(at(d, "base.qcow2"))
        .output()
        .expect("qemu-io");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}");
    common::qemu::run(
        Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
            .arg(at(d, "base.qcow2")),
    );
    blk.close().expect("close");
    drop(blk);
    assert!(std::fs::read(at(d, "base.qcow2")).expect("read") == base_before);
    // With -U (force share) nothing is locked.
    let opts = OpenOptions {
        format: Format::Qcow2,
        force_share: true,
        ..OpenOptions::default()
    };
    let blk = open_image(&at(d, "top.qcow2"), &opts).expect("force share");
    qemu_io("qcow2", &at(d, "base.qcow2"), &["write 0 512"]);
    drop(blk);
}

/// With `--cache none` every image of the chain is opened O_DIRECT; reads of the raw base and
/// of qcow2 metadata are padded to the logical block size and still match qemu-img.
#[test]
fn chain_with_cache_none() {
    if !have_qemu("chain_with_cache_none") {
        return;
    }
    let dir = disk_dir();
    let top = make_chain(dir.path(), 65536);
    let opts = OpenOptions {
        cache: block::CacheMode::None,
        ..ro()
    };
    let blk = match open_image(&top, &opts) {
        Ok(b) => b,
        Err(e) if e.to_string().contains("O_DIRECT") => {
            common::skip("chain_with_cache_none", &format!("no O_DIRECT here: {e}"));
            return;
        }
        Err(e) => panic!("open with cache=none: {e}"),
    };
    assert!(
        read_all(&blk, 9) == oracle_bytes(&top),
        "bytes differ with O_DIRECT"
    );
    check_map(&blk, &top);
}
