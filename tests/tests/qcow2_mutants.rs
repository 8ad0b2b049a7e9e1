//! Differential test of mutated qcow2 images through the real export, with `qemu-img` as the
//! oracle.
//!
//! Two small images made by `qemu-img`/`qemu-io` (4 KiB clusters, so tables are small: data,
//! zero and compressed clusters; and one over a raw backing file) are mutated deterministically
//! from fixed seeds: bit flips in the header, the L1 table, an L2 table, the refcount table or
//! a refcount block; a header field set to an interesting value; truncation; a zeroed cluster;
//! or two of these at once. For every mutant:
//!
//! 1. **read-only export** (`-r`): it mounts, or the daemon exits by itself with an error
//!    message (never a panic, never a hang: everything runs under timeouts). Every 64 KiB of
//!    the first 4 MiB is read through the mount. Wherever `qemu-img convert -O raw` reads a
//!    range (the whole image, or, when that fails, a 64 KiB raw window at a time), the export
//!    must serve the same bytes — or fail the read (EIO) having reported the image corrupt:
//!    QEMU reads tables and clusters that lie past the end of the file as zeros, our driver
//!    refuses them (`block/src/qcow2/mod.rs`, "Corruption"). When qemu-img cannot read a range,
//!    only "no panic, no hang" is required. The image file's bytes must be unchanged.
//! 2. **read-write export** of a copy: a few writes (errors allowed), each read back at once —
//!    it must read as written unless the daemon reported the image corrupt —, an fsync, then an
//!    external `umount`: the daemon must exit within seconds, without a panic.
//!
//! 24 mutants by default (well under a minute); `CORO_FUSE_FUZZ_MUTANTS=500` runs more,
//! `CORO_FUSE_FUZZ_SEED=N` starts from another seed. A failure names the seed and the
//! mutation, and leaves the mutant in the failure message's directory only as long as the test
//! runs (reproduce with `CORO_FUSE_FUZZ_SEED=<seed> CORO_FUSE_FUZZ_MUTANTS=1`).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CLUSTER: u64 = 4096;
/// Reads and comparisons cover at most this much of a mutant's virtual size.
const COMPARE_LIMIT: u64 = 4 * MIB;
const CHUNK: u64 = 64 * KIB;
/// A read, a write or an unmount that takes longer than this is a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// `qemu-img ARGS…` in `dir`; panics unless it succeeds.
fn qemu_img(dir: &Path, args: &[&str]) {
    let mut c = tool("qemu-img");
    c.current_dir(dir).args(args);
    run(&mut c).ok();
}

fn qemu_io(dir: &Path, format: &str, img: &str, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.current_dir(dir).args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(img)).ok();
}

/// The two base images: `plain.qcow2` (1 MiB: data, zero and compressed clusters) and
/// `top.qcow2` (1 MiB over `base.raw`, some clusters written, one zeroed).
fn make_bases(dir: &Path) -> Vec<Vec<u8>> {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "a.qcow2",
            "1M",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 0x41 0 64k",
            "write -P 0x42 300k 20k",
            "write -z 64k 8k",
        ],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "a.qcow2",
            "plain.qcow2",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "plain.qcow2",
        &[
            "write -P 0x43 700k 12k",
            "write -z 4k 4k",
            "write -P 0x44 1020k 4k",
        ],
    );
    qemu_img(dir, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
    qemu_io(dir, "raw", "base.raw", &["write -P 0x51 0 1M"]);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "1M",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x61 128k 16k",
            "write -z 512k 8k",
            "write -P 0x62 900k 4k",
        ],
    );
    ["plain.qcow2", "top.qcow2"]
        .iter()
        .map(|n| read_all(&dir.join(n)))
        .collect()
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
}

/// Where the metadata of a (valid) base image is: byte ranges to aim mutations at.
struct Layout {
    header: (u64, u64),
    l1: (u64, u64),
    l2: Vec<u64>,
    reftable: (u64, u64),
    refblocks: Vec<u64>,
}

fn layout(b: &[u8]) -> Layout {
    let mask = 0x00ff_ffff_ffff_fe00;
    let (l1_size, l1) = (u64::from(be32(b, 36)), be64(b, 40));
    let l2 = (0..l1_size)
        .map(|i| be64(b, l1 + 8 * i) & mask)
        .filter(|&o| o != 0)
        .collect();
    let rt = be64(b, 48);
    let rt_len = u64::from(be32(b, 56)) * CLUSTER;
    let refblocks = (0..rt_len / 8)
        .map(|i| be64(b, rt + 8 * i))
        .filter(|&o| o != 0)
        .collect();
    Layout {
        header: (0, 512),
        l1: (l1, l1_size * 8),
        l2,
        reftable: (rt, rt_len.min(CLUSTER)),
        refblocks,
    }
}

/// Header fields as (offset, width): every field a reader looks at.
const FIELDS: [(u64, usize); 17] = [
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
];

/// Flips `n` random bits in `[start, start+len)` of `b` (clipped to the file).
fn flip_bits(b: &mut [u8], rng: &mut Prng, (start, len): (u64, u64), n: u64) -> String {
    let end = (start + len).min(b.len() as u64);
    if start >= end {
        return "no-op (range outside the file)".into();
    }
    let mut what = Vec::new();
    for _ in 0..n {
        let at = rng.range(start, end);
        let bit = rng.below(8);
        b[at as usize] ^= 1 << bit;
        what.push(format!("{at:#x}.{bit}"));
    }
    format!("bit flips at {}", what.join(" "))
}

/// Applies mutation `kind` to `b`; returns what it did.
fn mutate(b: &mut Vec<u8>, kind: u64, rng: &mut Prng) -> String {
    let l = layout(b);
    let file_len = b.len() as u64;
    let pick = |rng: &mut Prng, v: &[u64]| -> u64 {
        if v.is_empty() {
            0
        } else {
            v[rng.below(v.len() as u64) as usize]
        }
    };
    match kind {
        0 => {
            let n = rng.range(1, 4);
            format!("header: {}", flip_bits(b, rng, l.header, n))
        }
        1 => {
            let n = rng.range(1, 4);
            format!("L1: {}", flip_bits(b, rng, l.l1, n))
        }
        2 => {
            let l2 = pick(rng, &l.l2);
            let n = rng.range(1, 6);
            format!("L2 at {l2:#x}: {}", flip_bits(b, rng, (l2, CLUSTER), n))
        }
        3 => {
            let range = if rng.below(2) == 0 {
                l.reftable
            } else {
                (pick(rng, &l.refblocks), 512)
            };
            let n = rng.range(1, 4);
            format!("refcounts: {}", flip_bits(b, rng, range, n))
        }
        4 => {
            let (at, width) = FIELDS[rng.below(FIELDS.len() as u64) as usize];
            let value = match rng.below(7) {
                0 => 0,
                1 => 1,
                2 => u64::MAX,
                3 => file_len,
                4 => file_len + CLUSTER,
                5 => rng.below(file_len / CLUSTER + 4) * CLUSTER,
                _ => rng.next_u64(),
            };
            let bytes = value.to_be_bytes();
            b[at as usize..at as usize + width].copy_from_slice(&bytes[8 - width..]);
            format!("header field at {at} ({width} bytes) = {value:#x}")
        }
        5 => {
            let len = rng.below(file_len);
            b.truncate(len as usize);
            format!("truncated to {len}")
        }
        6 => {
            let clusters = file_len / CLUSTER;
            let metadata = [
                l.l1.0,
                l.reftable.0,
                pick(rng, &l.l2),
                pick(rng, &l.refblocks),
            ];
            let c = if rng.below(2) == 0 {
                metadata[rng.below(4) as usize] / CLUSTER
            } else {
                rng.below(clusters)
            };
            let at = (c * CLUSTER) as usize;
            let end = (at + CLUSTER as usize).min(b.len());
            b[at..end].fill(0);
            format!("cluster {c} ({at:#x}) zeroed")
        }
        _ => {
            let first = mutate(b, rng.below(7), rng);
            let second = mutate(b, rng.below(7), rng);
            format!("{first}; then {second}")
        }
    }
}

/// Runs `f` on another thread and waits at most [`IO_TIMEOUT`]; a timeout fails the test as a
/// hang (the export guard then unmounts and kills the daemon, which unblocks the thread).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(IO_TIMEOUT) {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {IO_TIMEOUT:?} (a hang)"),
    }
}

/// Reads the first [`COMPARE_LIMIT`] bytes of the export by [`CHUNK`]: `None` for a chunk whose
/// read failed. Also returns the file's size.
fn read_export(path: PathBuf) -> (u64, Vec<Option<Vec<u8>>>) {
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = f.metadata().expect("fstat").len();
    let mut chunks = Vec::new();
    let mut pos = 0;
    while pos < size.min(COMPARE_LIMIT) {
        let n = CHUNK.min(size - pos) as usize;
        let mut buf = vec![0u8; n];
        chunks.push(f.read_exact_at(&mut buf, pos).ok().map(|()| buf));
        pos += n as u64;
    }
    (size, chunks)
}

/// What qemu-img reads of `img` in `[pos, pos+len)`, through a raw window over the qcow2
/// node; `None` when it fails.
fn qemu_window(dir: &Path, img: &Path, pos: u64, len: u64) -> Option<Vec<u8>> {
    let out = dir.join("window.raw");
    let _ = fs::remove_file(&out);
    let spec = format!(
        "json:{{\"driver\":\"raw\",\"offset\":{pos},\"size\":{len},\"file\":{{\"driver\":\"qcow2\",\
         \"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}}}",
        img.display()
    );
    let mut c = tool("qemu-img");
    c.current_dir(dir)
        .args(["convert", "-U", "-O", "raw"])
        .arg(&spec)
        .arg(&out);
    let r = run_timeout(&mut c, IO_TIMEOUT);
    r.success().then(|| read_all(&out))
}

/// The virtual size the header claims (what qemu-img would export).
fn claimed_size(b: &[u8]) -> u64 {
    be64(b, 24)
}

/// What qemu-img reads of the mutant, by chunk of the export: `Some(bytes)` where it read.
fn qemu_reads(dir: &Path, img: &Path, size: u64, chunks: usize) -> Vec<Option<Vec<u8>>> {
    if size <= 16 * MIB {
        let out = dir.join("whole.raw");
        let _ = fs::remove_file(&out);
        let mut c = tool("qemu-img");
        c.current_dir(dir)
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&out);
        if run_timeout(&mut c, IO_TIMEOUT).success() {
            let raw = read_all(&out);
            return (0..chunks)
                .map(|k| {
                    let at = k * CHUNK as usize;
                    raw.get(at..(at + CHUNK as usize).min(raw.len()))
                        .map(<[u8]>::to_vec)
                })
                .collect();
        }
    }
    (0..chunks as u64)
        .map(|k| {
            let pos = k * CHUNK;
            qemu_window(dir, img, pos, CHUNK.min(size - pos))
        })
        .collect()
}

/// Tallies over all mutants, printed at the end (and checked to be non-trivial).
#[derive(Default, Debug)]
struct Tally {
    refused_ro: usize,
    served_ro: usize,
    chunks_equal: usize,
    chunks_export_eio: usize,
    chunks_qemu_unreadable: usize,
    refused_rw: usize,
    served_rw: usize,
    rw_nonzero_exit: usize,
}

fn no_panic(stderr: &str, what: &str) {
    assert!(
        !stderr.contains("panicked"),
        "{what}: the daemon panicked\n{stderr}"
    );
}

/// Step 1 of the module doc for one mutant at `img`.
fn read_only_export(dir: &Path, img: &Path, what: &str, t: &mut Tally) {
    let before = read_all(img);
    let mnt = dir.join("mnt-ro");
    fs::write(&mnt, b"").expect("mountpoint");
    match Export::try_start(img, &mnt, &["-r", "-f", "qcow2"]) {
        Err(x) => {
            no_panic(&x.stderr, what);
            assert_ne!(x.code(), Some(0), "{what}: exit 0 without serving\n{x}");
            assert!(x.code().is_some(), "{what}: killed by a signal\n{x}");
            assert!(
                !x.stderr.trim().is_empty(),
                "{what}: exit without a message\n{x}"
            );
            t.refused_ro += 1;
        }
        Ok(mut e) => {
            t.served_ro += 1;
            let path = e.path().to_path_buf();
            let (size, chunks) = bounded(&format!("{what}: reading the read-only export"), {
                move || read_export(path)
            });
            assert_eq!(
                size,
                claimed_size(&before),
                "{what}: export size\n{}",
                e.logs()
            );
            let qemu = qemu_reads(dir, img, size, chunks.len());
            for (k, (ours, theirs)) in chunks.iter().zip(&qemu).enumerate() {
                match (ours, theirs) {
                    (Some(a), Some(b)) => {
                        assert_same_bytes(a, b, &format!("{what}: chunk {k} vs qemu-img"));
                        t.chunks_equal += 1;
                    }
                    (None, Some(_)) => {
                        // Deliberately stricter than QEMU, which reads metadata and data past
                        // the end of the file as zeros: our driver fails such requests as
                        // corrupt (qcow2/mod.rs, "Corruption"). Allowed only with that log.
                        let log = e.stderr();
                        assert!(
                            log.contains("image is corrupt"),
                            "{what}: chunk {k}: EIO where qemu-img reads, without a corruption \
                             report\n{}",
                            e.logs()
                        );
                        t.chunks_export_eio += 1
                    }
                    (_, None) => t.chunks_qemu_unreadable += 1,
                }
            }
            let x = e.stop();
            no_panic(&x.stderr, what);
            assert_eq!(x.code(), Some(0), "{what}: read-only export stop\n{x}");
        }
    }
    assert!(
        read_all(img) == before,
        "{what}: the read-only export changed the image file"
    );
}

/// Step 2 of the module doc for one mutant, on a copy at `img`.
fn read_write_export(dir: &Path, img: &Path, what: &str, t: &mut Tally) {
    let mnt = dir.join("mnt-rw");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = match Export::try_start(img, &mnt, &["-f", "qcow2"]) {
        Err(x) => {
            no_panic(&x.stderr, what);
            assert!(x.code().is_some(), "{what}: killed by a signal\n{x}");
            t.refused_rw += 1;
            return;
        }
        Ok(e) => e,
    };
    t.served_rw += 1;
    let path = e.path().to_path_buf();
    let mismatches = bounded(
        &format!("{what}: writing to the read-write export"),
        move || {
            let Ok(f) = fs::OpenOptions::new().read(true).write(true).open(&path) else {
                return Vec::new();
            };
            let size = f.metadata().map_or(0, |m| m.len()).min(COMPARE_LIMIT);
            let mut mismatches = Vec::new();
            let spots = [
                0,
                size / 2,
                size.saturating_sub(5000),
                123_456 % size.max(1),
            ];
            for (k, pos) in spots.into_iter().enumerate() {
                let data = vec![0x50 + k as u8; (size - pos.min(size)).min(8192) as usize];
                if f.write_all_at(&data, pos).is_ok() {
                    // Read back at once (O_DIRECT export: from the image, not a page cache).
                    let mut back = vec![0u8; data.len()];
                    if f.read_exact_at(&mut back, pos).is_ok() && back != data {
                        mismatches.push(pos);
                    }
                }
            }
            let _ = f.sync_all();
            mismatches
        },
    );
    // A write that reads back otherwise is allowed only once the image was reported corrupt.
    if !mismatches.is_empty() {
        assert!(
            e.stderr().contains("image is corrupt"),
            "{what}: writes at {mismatches:?} read back otherwise\n{}",
            e.logs()
        );
    }
    // An external unmount ends the daemon (retry while the mount is briefly busy).
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let out = run_timeout(tool("umount").arg(&mnt), IO_TIMEOUT);
        if out.success() || !e.is_mounted() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: umount keeps failing: {out}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let x = e
        .wait_exit(IO_TIMEOUT)
        .unwrap_or_else(|| panic!("{what}: still running after umount\n{}", e.logs()));
    no_panic(&x.stderr, what);
    assert!(x.code().is_some(), "{what}: killed by a signal\n{x}");
    if x.code() != Some(0) {
        t.rw_nonzero_exit += 1;
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_qcow2_images_through_the_export() {
    require!(
        fuse_available(),
        is_root(),
        have_tools(&["qemu-img", "qemu-io", "umount"])
    );
    let dir = workdir();
    let bases = make_bases(dir.path());
    let count = env_u64("CORO_FUSE_FUZZ_MUTANTS", 24);
    let first = env_u64("CORO_FUSE_FUZZ_SEED", 1);
    let mut t = Tally::default();
    let started = Instant::now();
    for seed in first..first + count {
        let mut rng = Prng::new(seed);
        let base = (seed % 2) as usize;
        let mut b = bases[base].clone();
        let kind = seed / 2 % 8;
        let how = mutate(&mut b, kind, &mut rng);
        let what = format!("seed {seed} ({} base: {how})", ["plain", "backing"][base]);
        let img = dir.path().join("mutant.qcow2");
        fs::write(&img, &b).expect("write the mutant");
        read_only_export(dir.path(), &img, &what, &mut t);
        let rw = dir.path().join("mutant-rw.qcow2");
        fs::write(&rw, &b).expect("write the mutant copy");
        read_write_export(dir.path(), &rw, &what, &mut t);
    }
    loud(&format!(
        "{count} mutants in {:.1?}: {t:?}",
        started.elapsed()
    ));
    // The mutations must bite, and some must still be served.
    assert!(t.served_ro > 0 && t.refused_ro > 0, "{t:?}");
    assert!(t.chunks_equal > 0, "{t:?}");
}
