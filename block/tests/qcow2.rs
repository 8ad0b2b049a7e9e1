//! The qcow2 driver's read side against images made by the real `qemu-img`/`qemu-io`, with
//! `qemu-img convert -O raw` and `qemu-img map --output=json` as independent oracles, and
//! corrupt images that must fail cleanly.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and fails
//! when `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::{open_image, BlockBackend, BlockError, BlockStatus, Format, OpenOptions};
use common::qemu::{create_qcow2, have_qemu, open_ro, oracle_bytes, oracle_map, qemu_io, run};
use common::{co, disk_dir, Lcg};

const MIB: u64 = 1 << 20;

/// Reads the whole image through the driver in requests of assorted sizes and offsets.
fn read_all(blk: &Arc<BlockBackend>, seed: u64) -> Vec<u8> {
    let b = blk.clone();
    co(move || {
        let size = b.size();
        let mut out = vec![0u8; size as usize];
        let mut rng = Lcg(seed);
        let mut pos = 0u64;
        while pos < size {
            let len = match rng.below(4) {
                0 => 1 + rng.below(4096),
                1 => 1 + rng.below(200_000),
                2 => MIB,
                _ => 3 * MIB + 7,
            }
            .min(size - pos);
            b.co_pread(pos, &mut out[pos as usize..(pos + len) as usize])
                .unwrap_or_else(|e| panic!("read {pos}+{len}: {e}"));
            pos += len;
        }
        out
    })
}

/// Our block status per 512-byte sector: true for data.
fn our_map(blk: &Arc<BlockBackend>) -> Vec<BlockStatus> {
    let b = blk.clone();
    co(move || {
        let size = b.size();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let (status, n) = b.co_block_status(pos, size - pos).expect("block status");
            assert!(n > 0 && n % 512 == 0 || pos + n == size, "{pos}+{n}");
            out.extend(std::iter::repeat_n(status, n.div_ceil(512) as usize));
            pos += n;
        }
        out
    })
}

fn check_map(blk: &Arc<BlockBackend>, path: &Path) {
    let ours = our_map(blk);
    for (start, len, data, zero) in oracle_map(path) {
        let want = if data {
            BlockStatus::Data
        } else {
            assert!(zero, "no backing file: not data means zero");
            BlockStatus::Zero
        };
        for s in start / 512..(start + len).div_ceil(512) {
            assert_eq!(ours[s as usize], want, "sector {s} of {}", path.display());
        }
    }
}

/// The image layout shared by the cluster-size tests: data, zero clusters over data and over
/// nothing, sub-cluster writes, a write at the very end, unallocated gaps.
fn populate(path: &Path, size: u64) {
    let end = format!("write -P 0x5e {} 4k", size - 4096);
    qemu_io(
        "qcow2",
        path,
        &[
            "write -P 0xab 1M 64k",
            "write -P 0xcd 2M 1M",
            "write -z 2560k 128k",
            "write -z 5M 256k",
            "write -P 0x11 6M 512",
            "write -P 0x22 6291968 1000",
            "write -P 0x33 7M 3M",
            &end,
        ],
    );
}

fn roundtrip(cluster_size: u64, compat: &str) {
    let test = format!("qcow2 cluster_size={cluster_size} compat={compat}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let size = 12 * MIB;
    let path = create_qcow2(
        dir.path(),
        "img.qcow2",
        &format!("cluster_size={cluster_size},compat={compat}"),
        size,
    );
    populate(&path, size);
    let blk = open_ro(&path);
    assert_eq!(blk.format_name(), "qcow2");
    assert_eq!(blk.size(), size);
    assert!(blk.is_read_only());
    let expected = oracle_bytes(&path);
    for seed in [1, 2] {
        assert!(
            read_all(&blk, seed) == expected,
            "{test}: bytes differ from qemu-img convert"
        );
    }
    check_map(&blk, &path);
}

#[test]
fn cluster_512() {
    roundtrip(512, "1.1");
}

#[test]
fn cluster_4k() {
    roundtrip(4096, "1.1");
}

#[test]
fn cluster_64k() {
    roundtrip(65536, "1.1");
}

#[test]
fn cluster_2m() {
    roundtrip(2 << 20, "1.1");
}

#[test]
fn version_2_image() {
    roundtrip(65536, "0.10");
}

#[test]
fn odd_virtual_size_and_explicit_format() {
    if !have_qemu("odd_virtual_size_and_explicit_format") {
        return;
    }
    let dir = disk_dir();
    let size = 5 * MIB + 512 * 3;
    let path = create_qcow2(dir.path(), "odd.qcow2", "cluster_size=65536", size);
    qemu_io(
        "qcow2",
        &path,
        &[
            &format!("write -P 0x77 {} 1536", size - 1536),
            "write -P 1 0 700",
        ],
    );
    let opts = OpenOptions {
        format: Format::Qcow2,
        read_only: true,
        ..OpenOptions::default()
    };
    let blk = open_image(&path, &opts).expect("open as qcow2");
    assert_eq!(blk.size(), size);
    assert!(read_all(&blk, 3) == oracle_bytes(&path));
    check_map(&blk, &path);
    let b = blk.clone();
    co(move || {
        let e = b.co_pwrite(0, b"x").expect_err("read-only");
        assert!(matches!(e, BlockError::ReadOnly), "{e}");
        assert!(b.co_pread(size, &mut [0u8; 1]).is_err(), "past the end");
    });
}

/// A writable open works (auto-detected or explicit) and holds QEMU's write lock: `qemu-io`
/// cannot write the image meanwhile, and can after close.
#[test]
fn writable_open_takes_the_write_lock() {
    if !have_qemu("writable_open_takes_the_write_lock") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "rw.qcow2", "cluster_size=65536", MIB);
    for format in [Format::Auto, Format::Qcow2] {
        let opts = OpenOptions {
            format,
            ..OpenOptions::default()
        };
        let blk = open_image(&path, &opts).expect("writable qcow2");
        assert!(!blk.is_read_only());
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write 0 512"])
            .arg(&path)
            .output()
            .expect("run qemu-io");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("lock"),
            "qemu-io must see our lock: {out:?}"
        );
        blk.close().expect("close");
        drop(blk);
        qemu_io("qcow2", &path, &["write -P 1 0 512"]);
    }
}

#[test]
fn compressed_images_match_qemu() {
    if !have_qemu("compressed_images_match_qemu") {
        return;
    }
    let dir = disk_dir();
    for cluster_size in [512u64, 4096, 65536, 2 << 20] {
        let size = 12 * MIB;
        let src = create_qcow2(
            dir.path(),
            "src.qcow2",
            &format!("cluster_size={cluster_size}"),
            size,
        );
        populate(&src, size);
        let packed = dir.path().join(format!("packed-{cluster_size}.qcow2"));
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-c",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster_size}"),
            ])
            .arg(&src)
            .arg(&packed));
        std::fs::remove_file(&src).expect("remove the source");
        let blk = open_ro(&packed);
        assert!(
            read_all(&blk, cluster_size) == oracle_bytes(&packed),
            "compressed {cluster_size}: bytes differ from qemu-img convert"
        );
        check_map(&blk, &packed);
    }
}

#[test]
fn compressed_random_data_matches_qemu() {
    if !have_qemu("compressed_random_data_matches_qemu") {
        return;
    }
    let dir = disk_dir();
    let mut rng = Lcg(11);
    // Half noise (stored/poorly compressible blocks), half repetitive text (dynamic codes).
    let mut raw: Vec<u8> = (0..4 * MIB).map(|_| rng.next() as u8).collect();
    for (i, b) in raw[2 * MIB as usize..].iter_mut().enumerate() {
        *b = b"the quick brown fox jumps over the lazy dog "[i % 44] ^ ((i / 5000) as u8 & 3);
    }
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &raw).expect("write raw");
    let packed = dir.path().join("packed.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&src)
        .arg(&packed));
    let blk = open_ro(&packed);
    assert!(read_all(&blk, 5) == raw, "bytes differ from the source");
    check_map(&blk, &packed);
}

// ---- corrupt images: clean errors, never a panic ----

/// A valid 4 MiB image with data at 1 MiB (64 KiB clusters).
fn valid_image(dir: &Path, name: &str) -> PathBuf {
    let path = create_qcow2(dir, name, "cluster_size=65536", 4 * MIB);
    qemu_io(
        "qcow2",
        &path,
        &["write -P 0xab 1M 64k", "write -P 0xcd 2M 64k"],
    );
    path
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open to patch");
    f.write_all_at(bytes, offset).expect("patch");
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(path).expect("read the image");
    let at = offset as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn open_err(path: &Path) -> BlockError {
    let opts = OpenOptions {
        format: Format::Qcow2,
        read_only: true,
        ..OpenOptions::default()
    };
    open_image(path, &opts).expect_err("a corrupt header must be refused")
}

#[test]
fn corrupt_headers_are_refused() {
    if !have_qemu("corrupt_headers_are_refused") {
        return;
    }
    let dir = disk_dir();
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("magic", 0, b"QFI\0", "bad magic"),
        ("bits", 20, &30u32.to_be_bytes(), "cluster_bits 30"),
        ("l1", 40, &(1u64 << 40).to_be_bytes(), "not inside the file"),
        (
            "l1align",
            40,
            &0x30008u64.to_be_bytes(),
            "not cluster aligned",
        ),
        ("l1size", 36, &0u32.to_be_bytes(), "does not cover"),
        ("crypt", 32, &1u32.to_be_bytes(), "encrypted"),
        ("extl2", 79, &[0x10], "extended L2"),
        ("unknown", 78, &[0x01], "bit 8"),
        ("corruptbit", 79, &[0x02], "marked corrupt"),
        ("datafile", 79, &[0x04], "external data files"),
        ("version", 4, &9u32.to_be_bytes(), "version 9"),
    ];
    for (name, offset, bytes, want) in cases {
        let path = valid_image(dir.path(), &format!("{name}.qcow2"));
        patch(&path, *offset, bytes);
        let e = open_err(&path);
        assert!(e.to_string().contains(want), "{name}: {e}");
        assert!(
            e.to_string().contains(&path.display().to_string()),
            "names the file: {e}"
        );
    }
}

#[test]
fn bad_l2_entries_fail_the_request_only() {
    if !have_qemu("bad_l2_entries_fail_the_request_only") {
        return;
    }
    let dir = disk_dir();
    let path = valid_image(dir.path(), "l2.qcow2");
    let l1_offset = be64_at(&path, 40);
    let l2_offset = be64_at(&path, l1_offset) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2_offset, 0);
    // Cluster 16 (1 MiB) points far past EOF; cluster 32 (2 MiB) is misaligned.
    patch(
        &path,
        l2_offset + 16 * 8,
        &((1u64 << 63) | (1u64 << 40)).to_be_bytes(),
    );
    let data_2m = be64_at(&path, l2_offset + 32 * 8);
    patch(&path, l2_offset + 32 * 8, &(data_2m + 512).to_be_bytes());
    let blk = open_ro(&path);
    let b = blk.clone();
    co(move || {
        let mut buf = vec![0u8; 65536];
        for off in [MIB, 2 * MIB, MIB - 512] {
            let e = b.co_pread(off, &mut buf).expect_err("bad L2 entry");
            assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
            assert_eq!(e.errno(), libc::EIO);
        }
        assert!(b.co_block_status(MIB, 65536).is_err());
        let before = b.co_block_status(0, 2 * MIB).expect("the extent before it");
        assert_eq!(before, (BlockStatus::Zero, MIB));
        b.co_pread(0, &mut buf).expect("other clusters still read");
    });
}

#[test]
fn l1_entry_past_eof_fails_cleanly() {
    if !have_qemu("l1_entry_past_eof_fails_cleanly") {
        return;
    }
    let dir = disk_dir();
    let path = valid_image(dir.path(), "l1e.qcow2");
    let l1_offset = be64_at(&path, 40);
    patch(
        &path,
        l1_offset,
        &((1u64 << 63) | (1u64 << 36)).to_be_bytes(),
    );
    let blk = open_ro(&path);
    let b = blk.clone();
    co(move || {
        let e = b.co_pread(MIB, &mut [0u8; 512]).expect_err("L2 past EOF");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
    });
}

#[test]
fn random_header_corruption_never_panics() {
    if !have_qemu("random_header_corruption_never_panics") {
        return;
    }
    let dir = disk_dir();
    let path = valid_image(dir.path(), "fuzz.qcow2");
    let original = std::fs::read(&path).expect("read");
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let mut bytes = original.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(112) as usize;
            bytes[at] = rng.next() as u8;
        }
        std::fs::write(&path, &bytes).expect("write");
        let opts = OpenOptions {
            format: Format::Qcow2,
            read_only: true,
            ..OpenOptions::default()
        };
        if let Ok(blk) = open_image(&path, &opts) {
            let b = blk.clone();
            co(move || {
                let size = b.size().min(8 * MIB);
                let mut buf = vec![0u8; 65536];
                let mut pos = 0;
                while pos < size {
                    let n = (size - pos).min(65536) as usize;
                    let _ = b.co_pread(pos, &mut buf[..n]);
                    pos += n as u64;
                }
            });
        }
    }
}

#[test]
fn corrupt_compressed_data_fails_the_request() {
    if !have_qemu("corrupt_compressed_data_fails_the_request") {
        return;
    }
    let dir = disk_dir();
    let src = valid_image(dir.path(), "src.qcow2");
    let packed = dir.path().join("packed.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "qcow2", "-O", "qcow2"])
        .arg(&src)
        .arg(&packed));
    let l1_offset = be64_at(&packed, 40);
    let l2_offset = be64_at(&packed, l1_offset) & 0x00ff_ffff_ffff_fe00;
    let entry = be64_at(&packed, l2_offset + 16 * 8);
    assert_ne!(entry & (1 << 62), 0, "cluster 16 is compressed");
    let host = entry & ((1 << 54) - 1); // 64 KiB clusters: x = 62 - (16 - 8)
    patch(&packed, host, &[0xff; 64]); // block type 3: invalid
    let blk = open_ro(&packed);
    let b = blk.clone();
    co(move || {
        let mut buf = vec![0u8; 4096];
        let e = b.co_pread(MIB, &mut buf).expect_err("bad deflate stream");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        b.co_pread(2 * MIB, &mut buf)
            .expect("the other compressed cluster");
        assert!(buf.iter().all(|&x| x == 0xcd));
    });
}

#[test]
fn concurrent_readers_on_iothreads() {
    if !have_qemu("concurrent_readers_on_iothreads") {
        return;
    }
    let dir = disk_dir();
    let size = 12 * MIB;
    // Small clusters: many L2 tables, so the cache misses and evicts under concurrency.
    let path = create_qcow2(dir.path(), "conc.qcow2", "cluster_size=512", size);
    populate(&path, size);
    let expected = Arc::new(oracle_bytes(&path));
    let blk = open_ro(&path);
    let threads: Vec<runtime::IoThread> = (0..3)
        .map(|i| runtime::IoThread::spawn(&format!("q{i}")).expect("iothread"))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (t, thread) in threads.iter().enumerate() {
        for c in 0..4u64 {
            let (b, tx, expected) = (blk.clone(), tx.clone(), expected.clone());
            thread.spawn_co(move || {
                let mut rng = Lcg(100 + t as u64 * 10 + c);
                let mut res = Ok(());
                for _ in 0..200 {
                    let off = rng.below(size);
                    let len = (1 + rng.below(300_000)).min(size - off) as usize;
                    let mut buf = vec![0u8; len];
                    res = res.and_then(|()| b.co_pread(off, &mut buf).map_err(|e| e.to_string()));
                    if res.is_ok() && buf[..] != expected[off as usize..off as usize + len] {
                        res = Err(format!("bytes differ at {off}+{len}"));
                    }
                }
                let _ = tx.send(res);
            });
        }
    }
    drop(tx);
    for r in rx.iter() {
        r.expect("a concurrent read failed");
    }
    for t in threads {
        t.stop();
    }
    assert_eq!(blk.in_flight(), 0);
}
