//! The read-only vmdk driver against the real `qemu-img`/`qemu-io`: every subformat `qemu-img`
//! makes (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat,
//! streamOptimized, also with compat6 and zeroed grains) must read byte for byte as
//! `qemu-img convert -O raw` writes it, and its block status must agree with
//! `qemu-img map`; a stream-optimized image with its grain directory in the footer reads too.
//! Corrupt images fail at open with a clear error or fail the reads that need the damaged
//! metadata (EIO), never panic. Writes go through an overlay, leaving the vmdk files unchanged.
//!
//! Needs `qemu-img` and `qemu-io` in PATH (else SKIPPED loudly; a failure when `CI=true`).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::overlay::{open_with_overlay, Overlay};
use block::{open_image, BlockBackend, BlockError, BlockStatus, Format, OpenOptions};
use common::qemu::{at, find_extension, have_qemu, oracle_map, patch, qemu_img, qemu_io, run};
use common::{co, disk_dir, Lcg};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// qcow2's backing format header extension.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn open_ro(path: &Path) -> Arc<BlockBackend> {
    open_image(path, &ro()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_err(path: &Path) -> BlockError {
    open_image(path, &ro()).expect_err("the image must be refused")
}

/// `qemu-img create -f vmdk -o OPTS DIR/NAME SIZE`, then the qemu-io commands.
fn make(dir: &Path, name: &str, opts: &str, size: u64, writes: &[&str]) -> PathBuf {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            opts,
            name,
            &size.to_string(),
        ],
    );
    let path = at(dir, name);
    if !writes.is_empty() {
        qemu_io("vmdk", &path, writes);
    }
    path
}

/// `qemu-img convert -O raw` of the image, as a (sparse) file beside it.
fn oracle_file(path: &Path) -> PathBuf {
    let raw = path.with_extension("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&raw));
    raw
}

/// Reads the whole image through the backend in requests of assorted sizes (which cross
/// grains and extents at odd offsets) and compares every byte with qemu-img's raw conversion,
/// 8 MiB at a time (the multi-extent images are over 2 GiB).
fn check_bytes(blk: &Arc<BlockBackend>, path: &Path, seed: u64) {
    let raw = oracle_file(path);
    let mut oracle = std::fs::File::open(&raw).expect("open the oracle");
    let size = blk.size();
    assert_eq!(
        std::fs::metadata(&raw).expect("oracle size").len(),
        size,
        "{}: virtual size",
        path.display()
    );
    let mut rng = Lcg(seed);
    let mut pos = 0u64;
    let mut want = vec![0u8; (8 * MIB) as usize];
    while pos < size {
        let chunk = (8 * MIB).min(size - pos) as usize;
        oracle
            .read_exact(&mut want[..chunk])
            .expect("read the oracle");
        let (b, start) = (blk.clone(), pos);
        let mut sizes = Vec::new();
        let mut n = 0u64;
        while n < chunk as u64 {
            let len = match rng.below(3) {
                0 => 1 + rng.below(5000),
                1 => 1 + rng.below(300_000),
                _ => 3 * MIB,
            }
            .min(chunk as u64 - n);
            sizes.push(len);
            n += len;
        }
        let got = co(move || {
            let mut out = vec![0u8; chunk];
            let mut at = 0usize;
            for len in sizes {
                let end = at + len as usize;
                b.co_pread(start + at as u64, &mut out[at..end])
                    .unwrap_or_else(|e| panic!("read {}+{len}: {e}", start + at as u64));
                at = end;
            }
            out
        });
        assert!(
            got == want[..chunk],
            "{}: bytes at {pos}..{} differ from qemu-img convert",
            path.display(),
            pos + chunk as u64
        );
        pos += chunk as u64;
    }
    std::fs::remove_file(&raw).expect("remove the oracle");
}

/// Our block status agrees with `qemu-img map` everywhere: what qemu calls data (and not
/// zero) is data, the rest (unallocated, zeroed grains, holes of a flat file) zero.
fn check_map(blk: &Arc<BlockBackend>, path: &Path) {
    for (start, len, data, zero) in oracle_map(path) {
        let want = if data && !zero {
            BlockStatus::Data
        } else {
            BlockStatus::Zero
        };
        let b = blk.clone();
        co(move || {
            let mut pos = start;
            while pos < start + len {
                let (status, n) = b
                    .co_block_status(pos, start + len - pos)
                    .unwrap_or_else(|e| panic!("block status at {pos}: {e}"));
                assert_eq!(status, want, "block status at {pos} (qemu: {start}+{len})");
                pos += n;
            }
        });
    }
}

/// The qemu-io writes of the subformat tests: data in the first grain, across grain and grain
/// table boundaries, an unaligned tail, and across the 2 GiB extent boundary when the disk is
/// that large.
fn writes(size: u64) -> Vec<String> {
    let mut w = vec![
        "write -P 0x11 0 4096".to_owned(),
        "write -P 0x12 100000 200000".into(),
        format!("write -P 0x13 {} 131072", 32 * MIB - 65536),
        format!("write -P 0x14 {} 1536", size - 2048),
    ];
    if size > 2 * GIB {
        w.push(format!("write -P 0x15 {} 1M", 2 * GIB - 512 * 1024));
    }
    w
}

fn subformat_matches_qemu(subformat: &str, extra: &str, size: u64) {
    let test = format!("subformat {subformat}{extra}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let w = writes(size);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let path = make(
        dir.path(),
        "disk.vmdk",
        &format!("subformat={subformat}{extra}"),
        size,
        &w,
    );
    let blk = open_ro(&path);
    assert_eq!(blk.format_name(), "vmdk");
    assert_eq!(blk.size(), size);
    check_bytes(&blk, &path, 1);
    check_map(&blk, &path);
    blk.close().expect("close");
}

#[test]
fn monolithic_sparse() {
    subformat_matches_qemu("monolithicSparse", "", 40 * MIB + 1536);
}

#[test]
fn monolithic_sparse_compat6_zeroed_grain() {
    subformat_matches_qemu("monolithicSparse", ",compat6=on,zeroed_grain=on", 40 * MIB);
}

#[test]
fn monolithic_flat() {
    subformat_matches_qemu("monolithicFlat", "", 40 * MIB + 1536);
}

#[test]
fn two_gb_max_extent_sparse() {
    subformat_matches_qemu("twoGbMaxExtentSparse", "", 2 * GIB + 6 * MIB);
}

#[test]
fn two_gb_max_extent_flat() {
    subformat_matches_qemu("twoGbMaxExtentFlat", "", 2 * GIB + 6 * MIB);
}

/// A raw image with data, a run of zeros written as data, and holes, converted to
/// streamOptimized by qemu-img.
fn stream_optimized(dir: &Path, size: u64) -> PathBuf {
    let raw = at(dir, "src.raw");
    qemu_img(
        dir,
        &["create", "-q", "-f", "raw", "src.raw", &size.to_string()],
    );
    qemu_io(
        "raw",
        &raw,
        &[
            "write -P 0x21 0 100000",
            "write -P 0x00 1M 128k",
            "write -P 0x22 3M 70000",
            &format!("write -P 0x23 {} 3000", size - 5000),
        ],
    );
    // Some incompressible bytes: a grain whose compressed form is larger than the grain.
    let noise = common::pattern(65536, 7)
        .iter()
        .scan(0x9e37_79b9_u32, |x, b| {
            *x ^= *x << 13;
            *x ^= *x >> 17;
            *x ^= *x << 5;
            Some(b ^ *x as u8)
        })
        .collect::<Vec<u8>>();
    patch(&raw, 5 * MIB, &noise);
    qemu_img(
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
            "so.vmdk",
        ],
    );
    at(dir, "so.vmdk")
}

#[test]
fn stream_optimized_matches_qemu() {
    if !have_qemu("stream_optimized_matches_qemu") {
        return;
    }
    let dir = disk_dir();
    let path = stream_optimized(dir.path(), 8 * MIB + 1536);
    let blk = open_ro(&path);
    assert_eq!(blk.size(), 8 * MIB + 1536);
    check_bytes(&blk, &path, 2);
    check_map(&blk, &path);
}

/// Moves a QEMU stream-optimized image's grain directory offset into a footer, as VMware's
/// one-pass writers do: the header says `GD_AT_END`, the last 1536 bytes are a footer marker,
/// the real header and an end-of-stream marker.
fn move_gd_to_footer(path: &Path) {
    let bytes = std::fs::read(path).expect("read");
    let mut header = bytes[..512].to_vec();
    let mut end = bytes.len() as u64;
    // QEMU ends the stream with an (all-zero) end-of-stream marker sector: the footer goes
    // before it, and a new one after.
    assert_eq!(end % 512, 0);
    if bytes[bytes.len() - 512..].iter().all(|&b| b == 0) {
        end -= 512;
    }
    let mut footer = vec![0u8; 1536];
    footer[0..8].copy_from_slice(&1u64.to_le_bytes()); // sectors of metadata that follow
    footer[12..16].copy_from_slice(&3u32.to_le_bytes()); // MARKER_FOOTER
    footer[512..1024].copy_from_slice(&header);
    header[56..64].copy_from_slice(&u64::MAX.to_le_bytes()); // GD_AT_END
    patch(path, 0, &header);
    patch(path, end, &footer);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len(end + 1536).expect("truncate");
}

#[test]
fn stream_optimized_with_the_directory_in_the_footer() {
    if !have_qemu("stream_optimized_with_the_directory_in_the_footer") {
        return;
    }
    let dir = disk_dir();
    let path = stream_optimized(dir.path(), 8 * MIB);
    let before = std::fs::read(oracle_file(&path)).expect("oracle before");
    move_gd_to_footer(&path);
    let blk = open_ro(&path);
    // qemu-img reads the footer too: it is the oracle of the changed file as well.
    check_bytes(&blk, &path, 3);
    check_map(&blk, &path);
    let after = std::fs::read(oracle_file(&path)).expect("oracle after");
    assert!(before == after, "moving the directory changed the disk");
    // A footer without its end-of-stream marker is refused.
    let len = std::fs::metadata(&path).expect("len").len();
    patch(&path, len - 512 + 12, &[9]);
    let e = open_err(&path);
    assert!(e.to_string().contains("footer"), "{e}");
}

#[test]
fn zeroed_grains_are_zero() {
    if !have_qemu("zeroed_grains_are_zero") {
        return;
    }
    let dir = disk_dir();
    let path = make(
        dir.path(),
        "zg.vmdk",
        "zeroed_grain=on",
        8 * MIB,
        &["write -P 0x31 0 1M", "write -z 64k 128k", "write -z 4M 64k"],
    );
    let map = oracle_map(&path);
    assert!(
        map.iter()
            .any(|&(s, _, data, zero)| s == 65536 && !data && zero),
        "qemu-io made zeroed grains: {map:?}"
    );
    let blk = open_ro(&path);
    check_bytes(&blk, &path, 4);
    check_map(&blk, &path);
}

#[test]
fn a_writable_open_is_refused_with_a_hint() {
    if !have_qemu("a_writable_open_is_refused_with_a_hint") {
        return;
    }
    let dir = disk_dir();
    let path = make(dir.path(), "d.vmdk", "subformat=monolithicSparse", MIB, &[]);
    for format in [Format::Auto, Format::Vmdk] {
        let opts = OpenOptions {
            format,
            ..OpenOptions::default()
        };
        let e = open_image(&path, &opts).expect_err("read-write must be refused");
        assert!(matches!(e, BlockError::ReadOnlyFormat { .. }), "{e:?}");
        assert_eq!(e.errno(), libc::EROFS);
        let msg = e.to_string();
        assert!(
            msg.contains("-r") && msg.contains("--snapshot") && msg.contains("d.vmdk"),
            "{msg}"
        );
    }
    let blk = open_image(
        &path,
        &OpenOptions {
            format: Format::Vmdk,
            ..ro()
        },
    )
    .expect("read-only with -f vmdk");
    let e = co(move || blk.co_pwrite(0, &[1]).expect_err("read-only"));
    assert_eq!(e.errno(), libc::EROFS);
}

/// Checksums of the vmdk files (descriptor and extents) in `dir` whose name starts with
/// `prefix`.
fn checksums(dir: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n.ends_with(".vmdk")
            })
        })
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a
            for b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            (p.display().to_string(), h)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn overlays_take_the_writes_and_the_vmdk_stays_unchanged() {
    if !have_qemu("overlays_take_the_writes_and_the_vmdk_stays_unchanged") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    for subformat in ["monolithicSparse", "monolithicFlat", "streamOptimized"] {
        let name = format!("{subformat}.vmdk");
        let path = if subformat == "streamOptimized" {
            let p = stream_optimized(d, 4 * MIB);
            std::fs::rename(&p, at(d, &name)).expect("rename");
            at(d, &name)
        } else {
            make(
                d,
                &name,
                &format!("subformat={subformat}"),
                4 * MIB,
                &["write -P 0x41 0 1M", "write -P 0x42 3M 4096"],
            )
        };
        let before = checksums(d, subformat);
        let base = std::fs::read(oracle_file(&path)).expect("oracle");
        for overlay in [
            Overlay::Temporary,
            Overlay::File(at(d, &format!("{subformat}.overlay.qcow2"))),
        ] {
            // What the CLI passes with --snapshot: writable, format probed.
            let opened =
                open_with_overlay(&path, &OpenOptions::default(), &[], &overlay).expect("overlay");
            assert_eq!(opened.image_format, "vmdk");
            let blk = opened.blk;
            let b = blk.clone();
            co(move || {
                b.co_pwrite(512 * 1024, &[0x55; 70000]).expect("write");
                b.co_pwrite_zeroes(2 * MIB, MIB, true).expect("zeroes");
                b.co_flush().expect("flush");
            });
            let mut want = base.clone();
            want[512 * 1024..512 * 1024 + 70000].fill(0x55);
            want[(2 * MIB) as usize..(3 * MIB) as usize].fill(0);
            let b = blk.clone();
            let got = co(move || {
                let mut out = vec![0u8; b.size() as usize];
                b.co_pread(0, &mut out).expect("read");
                out
            });
            assert!(got == want, "{subformat}: the overlay shows the writes");
            blk.close().expect("close");
            drop(blk); // and its lock
            if let Overlay::File(file) = &overlay {
                // qemu-img opens the kept overlay with its vmdk backing file: same bytes.
                let qemu = std::fs::read(oracle_file(file)).expect("oracle of the overlay");
                assert!(
                    qemu == want,
                    "{subformat}: qemu-img reads the overlay otherwise"
                );
            }
        }
        assert_eq!(
            checksums(d, subformat),
            before,
            "{subformat}: vmdk files changed"
        );
    }
}

#[test]
fn qcow2_images_with_a_vmdk_backing_file_open() {
    if !have_qemu("qcow2_images_with_a_vmdk_backing_file_open") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    make(
        d,
        "base.vmdk",
        "subformat=twoGbMaxExtentSparse",
        4 * MIB,
        &["write -P 0x51 0 2M"],
    );
    for (name, probed) in [("top.qcow2", false), ("probed.qcow2", true)] {
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                name,
            ],
        );
        if probed {
            // Without the backing format extension the backing file is probed: vmdk.
            let ext = find_extension(&at(d, name), EXT_BACKING_FORMAT).expect("has -F");
            patch(&at(d, name), ext, &0x7777_7777u32.to_be_bytes());
        }
        qemu_io("qcow2", &at(d, name), &["write -P 0x52 1M 64k"]);
        let blk = open_ro(&at(d, name));
        check_bytes(&blk, &at(d, name), 5);
        blk.close().expect("close");
    }
}

#[test]
fn extent_paths_relative_absolute_and_protocols() {
    if !have_qemu("extent_paths_relative_absolute_and_protocols") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    let path = make(
        d,
        "flat.vmdk",
        "subformat=monolithicFlat",
        2 * MIB,
        &["write -P 0x61 0 1M"],
    );
    let desc = std::fs::read_to_string(&path).expect("descriptor");
    // Opened from another working directory (the test runs in block/): found beside it.
    check_bytes(&open_ro(&path), &path, 6);
    // An absolute extent name, as QEMU allows.
    let flat = at(d, "flat-flat.vmdk");
    let abs = desc.replace("\"flat-flat.vmdk\"", &format!("\"{}\"", flat.display()));
    let sub = d.join("elsewhere");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(sub.join("abs.vmdk"), abs).expect("write");
    check_bytes(&open_ro(&sub.join("abs.vmdk")), &path, 7);
    // A protocol is refused by name.
    let nbd = desc.replace("\"flat-flat.vmdk\"", "\"nbd:localhost:10809\"");
    std::fs::write(at(d, "nbd.vmdk"), nbd).expect("write");
    let e = open_err(&at(d, "nbd.vmdk"));
    assert!(e.to_string().contains("protocol"), "{e}");
    // A missing extent names the file.
    let missing = desc.replace("\"flat-flat.vmdk\"", "\"gone.vmdk\"");
    std::fs::write(at(d, "missing.vmdk"), missing).expect("write");
    let e = open_err(&at(d, "missing.vmdk"));
    assert!(e.to_string().contains("gone.vmdk"), "{e}");
}

#[test]
fn delta_disks_are_refused() {
    if !have_qemu("delta_disks_are_refused") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    make(d, "base.vmdk", "subformat=monolithicSparse", MIB, &[]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "child.vmdk",
        ],
    );
    let e = open_err(&at(d, "child.vmdk"));
    assert!(
        e.to_string().contains("parent") && e.to_string().contains("child.vmdk"),
        "{e}"
    );
}

/// A monolithicSparse image with one grain written at 0: its header, directory and tables.
fn sparse_image(dir: &Path) -> PathBuf {
    make(
        dir,
        "s.vmdk",
        "subformat=monolithicSparse",
        4 * MIB,
        &["write -P 0x71 0 64k", "write -P 0x72 1M 64k"],
    )
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The byte offset of the grain table entry of guest offset `guest` (GT 0 only).
fn gte_offset(path: &Path, guest: u64) -> u64 {
    let b = std::fs::read(path).expect("read");
    let gd = le_u64(&b, 56) * 512;
    let gt = u64::from(le_u32(&b, gd as usize)) * 512;
    gt + guest / 65536 * 4
}

/// A named way to damage an image file.
type Corruption<'a> = (&'a str, &'a dyn Fn(&Path));

#[test]
fn corrupt_headers_fail_at_open() {
    if !have_qemu("corrupt_headers_fail_at_open") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    let cases: &[Corruption] = &[
        ("truncated", &|p| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .expect("open");
            f.set_len(1000).expect("truncate");
        }),
        ("tiny", &|p| {
            std::fs::write(p, b"KDMV\x01\0\0\0").expect("write")
        }),
        ("gd past EOF", &|p| {
            patch(p, 56, &(1u64 << 40).to_le_bytes())
        }),
        ("gd at 0", &|p| patch(p, 56, &0u64.to_le_bytes())),
        ("huge capacity", &|p| {
            patch(p, 12, &(u64::MAX / 2).to_le_bytes())
        }),
        ("capacity past the directory", &|p| {
            patch(p, 12, &(1u64 << 40).to_le_bytes())
        }),
        ("grain of 0", &|p| patch(p, 20, &0u64.to_le_bytes())),
        ("huge grain", &|p| patch(p, 20, &(1u64 << 40).to_le_bytes())),
        ("gtes per gt 4096", &|p| {
            patch(p, 44, &4096u32.to_le_bytes())
        }),
        ("version 4", &|p| patch(p, 4, &4u32.to_le_bytes())),
        ("compression 7", &|p| patch(p, 77, &7u16.to_le_bytes())),
        ("overhead past EOF", &|p| {
            patch(p, 64, &(1u64 << 30).to_le_bytes())
        }),
        ("footer missing", &|p| patch(p, 56, &u64::MAX.to_le_bytes())),
        ("COWD", &|p| patch(p, 0, b"COWD")),
        ("parent in the embedded descriptor", &|p| {
            patch(p, 512 + 21, b"\nparentFileNameHint=\"x.vmdk\"\n")
        }),
    ];
    for (what, damage) in cases {
        let path = sparse_image(d);
        damage(&path);
        let e = open_err(&path);
        let msg = e.to_string();
        assert!(msg.contains("s.vmdk"), "{what}: {msg}");
        eprintln!("{what}: {msg}");
        std::fs::remove_file(&path).expect("remove");
    }
}

#[test]
fn bad_descriptors_fail_at_open() {
    if !have_qemu("bad_descriptors_fail_at_open") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    let path = make(d, "f.vmdk", "subformat=twoGbMaxExtentFlat", 2 * MIB, &[]);
    let desc = std::fs::read_to_string(&path).expect("descriptor");
    let line = desc
        .lines()
        .find(|l| l.starts_with("RW "))
        .expect("an extent line")
        .to_owned();
    for (what, text) in [
        ("no createType", desc.replace("createType", "createTipe")),
        (
            "unknown createType",
            desc.replace("twoGbMaxExtentFlat", "custom"),
        ),
        ("no extents", desc.replace(&line, "")),
        (
            "bad sectors",
            desc.replace(&line, &line.replace("RW 4096", "RW x4096")),
        ),
        (
            "unknown type",
            desc.replace(&line, &line.replace("FLAT", "FLOT")),
        ),
        (
            "unclosed name",
            desc.replace(&line, "RW 4096 FLAT \"f-f001.vmdk 0"),
        ),
        (
            "no offset",
            desc.replace(&line, "RW 4096 FLAT \"f-f001.vmdk\""),
        ),
        (
            "sparse on a flat file",
            desc.replace(&line, "RW 4096 SPARSE \"f-f001.vmdk\""),
        ),
        ("directory", desc.replace(&line, "RW 4096 FLAT \".\" 0")),
        (
            "huge",
            desc.replace(&line, &format!("{line}\nRW 18014398509481983 ZERO")),
        ),
    ] {
        std::fs::write(&path, &text).expect("write");
        let e = open_err(&path);
        eprintln!("{what}: {e}");
        // Every error names the descriptor or the extent file.
        assert!(
            e.to_string().contains(&d.display().to_string()),
            "{what}: {e}"
        );
    }
}

#[test]
fn corrupt_tables_fail_the_reads_that_need_them() {
    if !have_qemu("corrupt_tables_fail_the_reads_that_need_them") {
        return;
    }
    let (one, two) = (disk_dir(), disk_dir());
    let path = sparse_image(one.path());
    let len = std::fs::metadata(&path).expect("len").len();
    // The entry of the grain at 1 MiB points past the end of the file.
    patch(
        &path,
        gte_offset(&path, MIB),
        &((len / 512 + 8) as u32).to_le_bytes(),
    );
    let blk = open_ro(&path);
    let b = blk.clone();
    co(move || {
        let mut buf = vec![0u8; 4096];
        b.co_pread(0, &mut buf).expect("the first grain is fine");
        assert!(buf.iter().all(|&x| x == 0x71));
        let e = b.co_pread(MIB, &mut buf).expect_err("a grain past EOF");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        let e = b.co_block_status(MIB, 4096).expect_err("an entry past EOF");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        b.co_pread(2 * MIB, &mut buf).expect("unallocated is fine");
        assert!(buf.iter().all(|&x| x == 0));
    });

    // The directory's entry points the grain table past the end of the file.
    let path = sparse_image(two.path());
    let b = std::fs::read(&path).expect("read");
    let gd = le_u64(&b, 56) * 512;
    patch(&path, gd, &((len / 512 + 8) as u32).to_le_bytes());
    let blk = open_ro(&path);
    let bk = blk.clone();
    co(move || {
        let mut buf = vec![0u8; 4096];
        let e = bk.co_pread(0, &mut buf).expect_err("a table past EOF");
        assert_eq!(e.errno(), libc::EIO);
        let e = bk.co_block_status(0, 4096).expect_err("a table past EOF");
        assert_eq!(e.errno(), libc::EIO);
    });
}

#[test]
fn compressed_garbage_fails_the_read() {
    if !have_qemu("compressed_garbage_fails_the_read") {
        return;
    }
    let dir = disk_dir();
    let path = stream_optimized(dir.path(), 8 * MIB);
    let gte = gte_offset(&path, 0);
    let bytes = std::fs::read(&path).expect("read");
    let grain = u64::from(le_u32(&bytes, gte as usize)) * 512;
    let blk = open_ro(&path);
    let mut cases: Vec<(&str, u64, Vec<u8>)> = vec![
        ("garbage", grain + 12, vec![0xa5; 64]),
        ("no zlib header", grain + 12, vec![0; 2]),
        (
            "marker of a huge size",
            grain + 8,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        ("metadata marker", grain + 8, 0u32.to_le_bytes().to_vec()),
        ("one byte", grain + 8, 1u32.to_le_bytes().to_vec()),
    ];
    drop(blk);
    for (what, at, patch_bytes) in cases.drain(..) {
        std::fs::write(&path, &bytes).expect("restore");
        patch(&path, at, &patch_bytes);
        let blk = open_ro(&path);
        let b = blk.clone();
        let e = co(move || {
            let mut buf = vec![0u8; 4096];
            b.co_pread(0, &mut buf).expect_err("a bad grain")
        });
        assert_eq!(e.errno(), libc::EIO, "{what}: {e}");
        // The rest of the disk is still served.
        let b = blk.clone();
        co(move || {
            let mut buf = vec![0u8; 4096];
            b.co_pread(3 * MIB, &mut buf).expect("another grain");
            assert!(buf.iter().all(|&x| x == 0x22), "{what}");
        });
    }
}

#[test]
fn o_direct_reads_the_same() {
    if !have_qemu("o_direct_reads_the_same") {
        return;
    }
    let dir = disk_dir();
    let d = dir.path();
    for subformat in ["monolithicSparse", "twoGbMaxExtentFlat"] {
        let name = format!("{subformat}.vmdk");
        let path = make(
            d,
            &name,
            &format!("subformat={subformat}"),
            8 * MIB + 512,
            &["write -P 0x81 1000 70000", "write -P 0x82 5M 4097"],
        );
        let opts = OpenOptions {
            cache: block::CacheMode::None,
            ..ro()
        };
        let blk = open_image(&path, &opts).unwrap_or_else(|e| panic!("{subformat}: {e}"));
        check_bytes(&blk, &path, 8);
        check_map(&blk, &path);
    }
}
