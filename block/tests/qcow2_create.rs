//! `block::qcow2::create_qcow2` against the real `qemu-img`: the image it makes is clean to
//! `qemu-img check`, described by `qemu-img info` as `qemu-img create -f qcow2` would make it
//! (v3 / compat 1.1, 64 KiB clusters, 16-bit refcounts, the size asked), sparse and instant at
//! any size, opened read-write by our driver, and what we write reads back through
//! `qemu-img convert`. Unaligned and too big sizes are refused, an existing file is kept.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and fails
//! when `CI=true`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::qcow2::create_qcow2;
use block::{open_image, BlockBackend, BlockError, Format, OpenOptions};
use common::qemu::{have_qemu, oracle_bytes, run};
use common::{co, disk_dir, pattern};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({:?}):\n{}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json`, the few fields we compare (a tiny ad-hoc extraction: the
/// top-level fields come after the "children" array, so the last occurrence is the image's).
fn info_field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\": ");
    let at = json
        .rfind(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    json[at..]
        .split([',', '\n'])
        .next()
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_owned()
}

fn info(path: &Path) -> String {
    run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path))
}

#[test]
fn created_images_are_what_qemu_img_create_makes() {
    if !have_qemu("created_images_are_what_qemu_img_create_makes") {
        return;
    }
    let dir = disk_dir();
    for size in [512, MIB, GIB, 100 * GIB, 8 << 40] {
        let path = dir.path().join(format!("{size}.qcow2"));
        let t = Instant::now();
        create_qcow2(&path, size).expect("create");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "creation must be instant"
        );
        check_clean(&path);
        let json = info(&path);
        assert_eq!(info_field(&json, "format"), "qcow2", "{json}");
        assert_eq!(
            info_field(&json, "virtual-size"),
            size.to_string(),
            "{json}"
        );
        assert_eq!(info_field(&json, "cluster-size"), "65536", "{json}");
        assert_eq!(info_field(&json, "compat"), "1.1", "{json}");
        assert_eq!(info_field(&json, "refcount-bits"), "16", "{json}");
        assert_eq!(info_field(&json, "compression-type"), "zlib", "{json}");
        assert!(!json.contains("backing-filename"), "{json}");
        // The L1 table: one entry per 512 MiB, from cluster 3, the file ending after it.
        let bytes_head = std::fs::read(&path).unwrap();
        let l1_size = u32::from_be_bytes(bytes_head[36..40].try_into().unwrap()) as u64;
        assert_eq!(l1_size, size.div_ceil(512 * MIB), "l1_size for {size}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (3 + (l1_size * 8).div_ceil(65536)) * 65536);
        assert!(
            meta.blocks() * 512 <= 4 * 65536,
            "sparse: {} blocks",
            meta.blocks()
        );
        // The same as qemu-img's own image, as far as reading goes.
        let theirs = dir.path().join(format!("{size}.ref.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&theirs)
            .arg(size.to_string()));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&path)
            .arg(&theirs));
    }
}

fn open_rw(path: &Path, format: Format) -> Arc<BlockBackend> {
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    let blk = open_image(path, &opts).expect("open the new image read-write");
    assert_eq!(blk.format_name(), "qcow2");
    assert!(!blk.is_read_only());
    blk
}

#[test]
fn our_driver_writes_and_qemu_reads_back() {
    if !have_qemu("our_driver_writes_and_qemu_reads_back") {
        return;
    }
    let dir = disk_dir();
    let size = 64 * MIB;
    let path = dir.path().join("rw.qcow2");
    create_qcow2(&path, size).unwrap();
    let mut want = vec![0u8; size as usize];
    let writes = [(0, 4096), (5 * MIB + 123, 200_000), (size - 70_000, 70_000)];
    for (i, &(off, len)) in writes.iter().enumerate() {
        want[off as usize..off as usize + len].copy_from_slice(&pattern(len, i as u8 + 1));
    }
    for format in [Format::Qcow2, Format::Auto] {
        let blk = open_rw(&path, format);
        assert_eq!(blk.size(), size);
        let b = blk.clone();
        let w = want.clone();
        co(move || {
            for &(off, len) in &writes {
                b.co_pwrite(off, &w[off as usize..off as usize + len])
                    .expect("write");
            }
            let mut got = vec![0u8; size as usize];
            b.co_pread(0, &mut got).expect("read");
            assert!(got == w, "read back through our driver");
        });
        blk.close().expect("close");
        drop(blk);
        check_clean(&path);
        assert!(
            oracle_bytes(&path) == want,
            "qemu-img convert reads what we wrote"
        );
    }
}

#[test]
fn bad_sizes_and_existing_files_are_refused() {
    let dir = disk_dir();
    for size in [1, 1000, MIB + 1, (2 << 50) + 512, u64::MAX - 511] {
        let path = dir.path().join(format!("{size}.qcow2"));
        match create_qcow2(&path, size) {
            Err(BlockError::Invalid(m)) => assert!(m.contains("size"), "{m}"),
            other => panic!("size {size}: {other:?}"),
        }
        assert!(!path.exists(), "a refused size leaves no file");
    }
    let path = dir.path().join("exists.qcow2");
    std::fs::write(&path, b"keep me").unwrap();
    match create_qcow2(&path, MIB) {
        Err(BlockError::Open { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists)
        }
        other => panic!("existing file: {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}
