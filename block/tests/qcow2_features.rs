//! qcow2 features made by the real `qemu-img`: zstd-compressed clusters (compared with
//! `qemu-img convert -O raw`), header extensions that are kept (bitmaps) and features that must
//! be refused at open with a clear message (external data file, encryption, extended L2, the
//! corrupt bit, bad tables).
//!
//! Needs `qemu-img` and `qemu-io` in PATH (else SKIPPED loudly; a failure when `CI=true`).

mod common;

use std::path::Path;
use std::process::Command;

use block::{open_image, Format, OpenOptions};
use common::qemu::{
    at, check_map, have_qemu, oracle_bytes, patch, qemu_img, qemu_io, read_all, run,
};
use common::{disk_dir, skip, Lcg};

const MIB: u64 = 1 << 20;

fn open_err(path: &Path) -> String {
    let opts = OpenOptions {
        format: Format::Qcow2,
        read_only: true,
        ..OpenOptions::default()
    };
    let e = open_image(path, &opts).expect_err("must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    msg
}

/// Whether this qemu-img can write zstd-compressed images (built with libzstd).
fn qemu_has_zstd(dir: &Path) -> bool {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "probe.qcow2",
            "1M",
        ])
        .output()
        .expect("qemu-img");
    out.status.success()
}

#[test]
fn zstd_compressed_images_match_qemu() {
    let test = "zstd_compressed_images_match_qemu";
    if !have_qemu(test) {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    if !qemu_has_zstd(d) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: qemu-img without zstd under CI"
        );
        skip(
            test,
            "this qemu-img cannot create zstd images (built without libzstd)",
        );
        return;
    }
    // Noise (incompressible: QEMU stores such clusters uncompressed), text (compressible),
    // a sub-cluster tail, zeros.
    let size = 6 * MIB;
    let mut rng = Lcg(7);
    let mut raw: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
    for (i, b) in raw[MIB as usize..4 * MIB as usize].iter_mut().enumerate() {
        *b = b"zstandard clusters in a qcow2 image; "[i % 37] ^ ((i / 7000) as u8 & 7);
    }
    raw[4 * MIB as usize..5 * MIB as usize].fill(0);
    std::fs::write(at(d, "src.raw"), &raw).expect("write the source");
    for cluster_size in [512u64, 4096, 65536, 2 << 20] {
        let name = format!("z-{cluster_size}.qcow2");
        let opts = format!("compression_type=zstd,cluster_size={cluster_size}");
        qemu_img(
            d,
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", &name,
            ],
        );
        let img = at(d, &name);
        let blk = common::qemu::open_ro(&img);
        assert!(
            read_all(&blk, cluster_size) == raw,
            "zstd {cluster_size}: bytes differ from the source"
        );
        assert!(read_all(&blk, 1) == oracle_bytes(&img));
        check_map(&blk, &img);
    }
}

#[test]
fn zstd_cluster_damage_fails_the_request_only() {
    let test = "zstd_cluster_damage_fails_the_request_only";
    if !have_qemu(test) {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    if !qemu_has_zstd(d) {
        skip(test, "this qemu-img cannot create zstd images");
        return;
    }
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "z.qcow2",
            "1M",
        ],
    );
    qemu_io(
        "qcow2",
        &at(d, "z.qcow2"),
        &["write -c -P 0x61 0 64k", "write -c -P 0x62 64k 64k"],
    );
    // The first compressed cluster starts with the zstd magic: break it.
    let bytes = std::fs::read(at(d, "z.qcow2")).expect("read");
    let magic = [0x28, 0xb5, 0x2f, 0xfd];
    let at_magic = bytes
        .windows(4)
        .position(|w| w == magic)
        .expect("a zstd frame");
    patch(&at(d, "z.qcow2"), at_magic as u64 + 4, &[0xff; 8]);
    let blk = common::qemu::open_ro(&at(d, "z.qcow2"));
    let b = blk.clone();
    common::co(move || {
        let mut buf = vec![0u8; 65536];
        let bad = (0..2)
            .filter(|i| b.co_pread(i * 65536, &mut buf).is_err())
            .count();
        assert_eq!(bad, 1, "exactly the damaged cluster fails");
    });
}

#[test]
fn refused_features_of_real_images() {
    if !have_qemu("refused_features_of_real_images") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "ext.qcow2",
            "1M",
        ],
    );
    assert!(open_err(&at(d, "ext.qcow2")).contains("external data files are not supported"));

    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "l2.qcow2",
            "1M",
        ],
    );
    assert!(open_err(&at(d, "l2.qcow2")).contains("extended L2"));

    let enc = Command::new("qemu-img")
        .current_dir(d)
        .args([
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "enc.qcow2",
            "1M",
        ])
        .output()
        .expect("qemu-img");
    if enc.status.success() {
        assert!(open_err(&at(d, "enc.qcow2")).contains("encrypted"));
    } else {
        skip(
            "refused_features_of_real_images (luks part)",
            "qemu-img cannot encrypt",
        );
    }

    // The corrupt bit (incompatible bit 1, byte 79) and a refcount table moved past the end.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "c.qcow2", "1M"]);
    patch(&at(d, "c.qcow2"), 79, &[2]);
    assert!(open_err(&at(d, "c.qcow2")).contains("marked corrupt"));
    qemu_img(d, &["create", "-q", "-f", "qcow2", "r.qcow2", "1M"]);
    patch(&at(d, "r.qcow2"), 48, &(1u64 << 40).to_be_bytes());
    assert!(open_err(&at(d, "r.qcow2")).contains("refcount table"));
}

#[test]
fn bitmaps_extension_is_kept_and_reads_work() {
    if !have_qemu("bitmaps_extension_is_kept_and_reads_work") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "2M"]);
    qemu_io("qcow2", &at(d, "b.qcow2"), &["write -P 0x71 64k 64k"]);
    run(Command::new("qemu-img")
        .current_dir(d)
        .args(["bitmap", "--add", "b.qcow2", "dirty0"]));
    let file = block::FileDriver::open(
        &at(d, "b.qcow2"),
        &block::FileOptions {
            read_only: true,
            ..block::FileOptions::default()
        },
    )
    .expect("open");
    let q = block::Qcow2Driver::open(std::sync::Arc::new(file)).expect("bitmaps are fine");
    assert!(q.header().has_bitmaps);
    drop(q);
    let blk = common::qemu::open_ro(&at(d, "b.qcow2"));
    assert!(read_all(&blk, 2) == oracle_bytes(&at(d, "b.qcow2")));
}
