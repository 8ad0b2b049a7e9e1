//! The writable qcow2 driver against the real `qemu-img`: random writes of odd sizes and
//! offsets (some concurrent, from several threads) applied both through the driver and to an
//! in-memory raw oracle, then `qemu-img check` must be clean and `qemu-img compare` must find
//! the image identical to the oracle. Also zero writes, discard, truncate, internal snapshots,
//! compressed clusters, and what a writable open refuses.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and fails
//! when `CI=true`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{open_image, BlockBackend, BlockError, Format, OpenOptions};
use common::qemu::{create_qcow2, have_qemu, oracle_bytes, qemu_io, run};
use common::{co, disk_dir, skip};

const MIB: u64 = 1 << 20;

/// A tiny xorshift64 generator: reproducible, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let fill = self.next();
        let mut x = fill | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

/// `qemu-img check`: its exit code (0 clean, 2 errors, 3 leaks only) and its output.
fn qemu_img_check(path: &Path) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text.into_owned())
}

/// `qemu-img check` must report no errors and no leaks (exit 0).
fn check_clean(path: &Path) {
    let (code, out) = qemu_img_check(path);
    assert_eq!(code, Some(0), "qemu-img check {}: {out}", path.display());
}

/// `qemu-img snapshot OP NAME` (`-c` create, `-a` apply, `-d` delete).
fn snapshot(path: &Path, op: &str, name: &str) {
    run(Command::new("qemu-img")
        .args(["snapshot", op, name])
        .arg(path));
}

/// `qemu-img compare` of the image with a raw oracle must say identical (exit 0).
fn compare(path: &Path, oracle: &[u8]) {
    let raw = path.with_extension("oracle.raw");
    std::fs::write(&raw, oracle).expect("write the oracle");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(path)
        .output()
        .expect("run qemu-img compare");
    std::fs::remove_file(&raw).expect("remove the oracle");
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare oracle {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_rw(path: &Path) -> Arc<BlockBackend> {
    let blk = open_image(path, &OpenOptions::default()).expect("open the qcow2 image read-write");
    assert_eq!(blk.format_name(), "qcow2");
    assert!(!blk.is_read_only());
    blk
}

/// Closes (flushes) the backend; the file and its locks go with the last reference.
fn close(blk: Arc<BlockBackend>) {
    blk.close().expect("close");
    drop(blk);
}

/// A request length: tiny, sub-cluster, odd hundreds of KiB, or a whole 1 MiB + a bit.
fn odd_len(rng: &mut XorShift) -> u64 {
    match rng.below(4) {
        0 => 1 + rng.below(4096),
        1 => 1 + rng.below(70_000),
        2 => 1 + rng.below(300_000),
        _ => MIB + rng.below(3) * 7,
    }
}

/// `count` writes of random bytes at random places, through the driver and into `oracle`.
fn random_writes(blk: &Arc<BlockBackend>, oracle: &mut [u8], seed: u64, count: usize) {
    let size = oracle.len() as u64;
    let mut rng = XorShift(seed);
    let mut reqs = Vec::new();
    for _ in 0..count {
        let off = rng.below(size);
        let len = odd_len(&mut rng).min(size - off);
        let data = rng.bytes(len as usize);
        oracle[off as usize..(off + len) as usize].copy_from_slice(&data);
        reqs.push((off, data));
    }
    let b = blk.clone();
    co(move || {
        for (off, data) in reqs {
            b.co_pwrite(off, &data)
                .unwrap_or_else(|e| panic!("write {off}+{}: {e}", data.len()));
        }
    });
}

/// Disjoint stripes of an odd size (neighbours share clusters) written concurrently by
/// coroutines on `threads` iothreads, in a shuffled order.
fn concurrent_stripes(blk: &Arc<BlockBackend>, oracle: &mut [u8], seed: u64, threads: usize) {
    let size = oracle.len() as u64;
    let mut rng = XorShift(seed);
    let stripe = (20_000 + rng.below(50_000)) | 1;
    let workers = threads * 2;
    let mut jobs: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); workers];
    let mut off = rng.below(stripe);
    let mut i = 0;
    while off < size {
        let len = stripe.min(size - off);
        if rng.below(3) > 0 {
            let data = rng.bytes(len as usize);
            oracle[off as usize..(off + len) as usize].copy_from_slice(&data);
            jobs[i % workers].push((off, data));
        }
        off += len;
        i += 1;
    }
    for j in jobs.iter_mut() {
        for k in (1..j.len()).rev() {
            j.swap(k, rng.below(k as u64 + 1) as usize);
        }
    }
    let iothreads: Vec<runtime::IoThread> = (0..threads)
        .map(|t| runtime::IoThread::spawn(&format!("w{t}")).expect("iothread"))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (w, job) in jobs.into_iter().enumerate() {
        let (b, tx) = (blk.clone(), tx.clone());
        iothreads[w % threads].spawn_co(move || {
            let mut res = Ok(());
            for (off, data) in job {
                if let Err(e) = b.co_pwrite(off, &data) {
                    res = Err(format!("write {off}+{}: {e}", data.len()));
                    break;
                }
            }
            let _ = tx.send(res);
        });
    }
    drop(tx);
    for r in rx.iter() {
        r.expect("a concurrent write failed");
    }
    for t in iothreads {
        t.stop();
    }
    assert_eq!(blk.in_flight(), 0);
}

/// Reads the whole image through the driver.
fn read_back(blk: &Arc<BlockBackend>) -> Vec<u8> {
    let b = blk.clone();
    co(move || {
        let size = b.size();
        let mut out = vec![0u8; size as usize];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(3 * MIB + 11);
            b.co_pread(pos, &mut out[pos as usize..(pos + n) as usize])
                .unwrap_or_else(|e| panic!("read {pos}+{n}: {e}"));
            pos += n;
        }
        out
    })
}

/// Zero writes (with and without unmap) and discards of random ranges; the oracle follows:
/// zeroed bytes read zero, discard zeroes whole clusters only.
fn zeroes_and_discards(blk: &Arc<BlockBackend>, oracle: &mut [u8], cs: u64, seed: u64) {
    let size = oracle.len() as u64;
    let mut rng = XorShift(seed);
    let mut ops = Vec::new();
    for i in 0..12 {
        let off = rng.below(size);
        let len = (1 + rng.below(4 * cs + 300_000)).min(size - off);
        let discard = i % 3 == 2;
        if discard {
            let start = off.div_ceil(cs) * cs;
            let end = if off + len == size {
                size
            } else {
                (off + len) / cs * cs
            };
            if start < end {
                oracle[start as usize..end as usize].fill(0);
            }
        } else {
            oracle[off as usize..(off + len) as usize].fill(0);
        }
        ops.push((off, len, discard, i % 2 == 0));
    }
    let b = blk.clone();
    co(move || {
        for (off, len, discard, unmap) in ops {
            let res = if discard {
                b.co_pdiscard(off, len)
            } else {
                b.co_pwrite_zeroes(off, len, unmap)
            };
            res.unwrap_or_else(|e| panic!("zero/discard {off}+{len}: {e}"));
        }
    });
}

/// The main scenario for one cluster size and compat level.
fn write_roundtrip(cluster_size: u64, compat: &str, size: u64) {
    let test = format!("qcow2 write cluster_size={cluster_size} compat={compat}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(
        dir.path(),
        "w.qcow2",
        &format!("cluster_size={cluster_size},compat={compat}"),
        size,
    );
    // Some clusters written by QEMU first: we overwrite them in place.
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 0xab 1M 300k",
            &format!("write -P 0xcd {} 4k", size - 4096),
        ],
    );
    let mut oracle = oracle_bytes(&path);
    let reftable = be64_at(&path, 48);
    let blk = open_rw(&path);
    random_writes(&blk, &mut oracle, cluster_size ^ 0x5eed, 60);
    concurrent_stripes(&blk, &mut oracle, cluster_size + 1, 3);
    zeroes_and_discards(&blk, &mut oracle, cluster_size, cluster_size + 2);
    random_writes(&blk, &mut oracle, cluster_size + 3, 40);
    assert!(read_back(&blk) == oracle, "{test}: bytes read back differ");
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
    if cluster_size == 512 {
        // 512-byte clusters: one refcount table cluster covers 8 MiB of file, so this image
        // outgrew it and the table was moved.
        assert_ne!(
            be64_at(&path, 48),
            reftable,
            "the refcount table was not moved"
        );
    }
}

#[test]
fn write_cluster_512() {
    write_roundtrip(512, "1.1", 12 * MIB);
}

#[test]
fn write_cluster_4k() {
    write_roundtrip(4096, "1.1", 12 * MIB);
}

#[test]
fn write_cluster_64k() {
    write_roundtrip(65536, "1.1", 24 * MIB);
}

#[test]
fn write_cluster_2m() {
    write_roundtrip(2 << 20, "1.1", 24 * MIB);
}

#[test]
fn write_version_2() {
    write_roundtrip(65536, "0.10", 12 * MIB);
}

#[test]
fn write_version_2_small_clusters() {
    write_roundtrip(512, "0.10", 12 * MIB);
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(path).expect("read the image");
    let at = offset as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open to patch");
    f.write_all_at(bytes, offset).expect("patch");
}

/// Writes after `qemu-img snapshot -c`: shared clusters and L2 tables are copied, the snapshot
/// keeps the old contents.
#[test]
fn internal_snapshot_is_preserved() {
    if !have_qemu("internal_snapshot_is_preserved") {
        return;
    }
    let dir = disk_dir();
    for (cs, compat) in [(65536u64, "1.1"), (4096, "1.1"), (65536, "0.10")] {
        let size = 8 * MIB;
        let path = create_qcow2(
            dir.path(),
            &format!("snap-{cs}-{compat}.qcow2"),
            &format!("cluster_size={cs},compat={compat}"),
            size,
        );
        qemu_io(
            "qcow2",
            &path,
            &[
                "write -P 0x11 0 3M",
                "write -P 0x22 5M 1M",
                "write -P 0x33 7M 100k",
            ],
        );
        let before = oracle_bytes(&path);
        snapshot(&path, "-c", "s1");
        let mut oracle = before.clone();
        let blk = open_rw(&path);
        let b = blk.clone();
        co(move || {
            let e = b
                .co_truncate(size - MIB)
                .expect_err("shrinking with snapshots");
            assert!(e.to_string().contains("internal snapshots"), "{e}");
        });
        random_writes(&blk, &mut oracle, cs + 7, 40);
        zeroes_and_discards(&blk, &mut oracle, cs, cs + 8);
        concurrent_stripes(&blk, &mut oracle, cs + 9, 2);
        close(blk);
        check_clean(&path);
        compare(&path, &oracle);
        snapshot(&path, "-a", "s1");
        check_clean(&path);
        compare(&path, &before);
        // And once more on top of the reverted image, then without the snapshot.
        let mut oracle = before.clone();
        let blk = open_rw(&path);
        random_writes(&blk, &mut oracle, cs + 10, 20);
        close(blk);
        snapshot(&path, "-d", "s1");
        check_clean(&path);
        compare(&path, &oracle);
    }
}

/// Partial overwrites of compressed clusters: copy-on-write from the inflated cluster, the
/// compressed cluster's host clusters released.
#[test]
fn compressed_clusters_overwritten() {
    if !have_qemu("compressed_clusters_overwritten") {
        return;
    }
    let dir = disk_dir();
    for cs in [4096u64, 65536] {
        let size = 8 * MIB;
        let src = create_qcow2(dir.path(), "src.qcow2", &format!("cluster_size={cs}"), size);
        qemu_io(
            "qcow2",
            &src,
            &[
                "write -P 0x41 0 2M",
                "write -P 0x42 3M 1M",
                "write -P 0x43 6M 3k",
            ],
        );
        let packed = dir.path().join(format!("packed-{cs}.qcow2"));
        run(Command::new("qemu-img")
            .args(["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o"])
            .arg(format!("cluster_size={cs}"))
            .arg(&src)
            .arg(&packed));
        std::fs::remove_file(&src).expect("remove the source");
        let mut oracle = oracle_bytes(&packed);
        let blk = open_rw(&packed);
        random_writes(&blk, &mut oracle, cs + 20, 30);
        zeroes_and_discards(&blk, &mut oracle, cs, cs + 21);
        assert!(
            read_back(&blk) == oracle,
            "compressed {cs}: bytes read back differ"
        );
        close(blk);
        check_clean(&packed);
        compare(&packed, &oracle);
    }
}

/// Truncate: grow past the L1 table (which moves), shrink refused while data would be lost,
/// allowed once it is discarded; the tail of the last cluster reads zeros after growing.
#[test]
fn truncate_grow_and_shrink() {
    if !have_qemu("truncate_grow_and_shrink") {
        return;
    }
    let dir = disk_dir();
    for (cs, compat) in [(512u64, "1.1"), (65536, "1.1"), (4096, "0.10")] {
        let size = MIB + 1536;
        let path = create_qcow2(
            dir.path(),
            &format!("t-{cs}.qcow2"),
            &format!("cluster_size={cs},compat={compat}"),
            size,
        );
        let l1_before = be64_at(&path, 40);
        let blk = open_rw(&path);
        let mut oracle = vec![0u8; size as usize];
        random_writes(&blk, &mut oracle, cs + 30, 10);
        let grown = 40 * MIB + 512;
        let b = blk.clone();
        co(move || {
            // Shrink below written data: refused.
            let e = b.co_truncate(4096).expect_err("data would be lost");
            assert!(matches!(e, BlockError::Invalid(_)), "{e}");
            assert_eq!(e.errno(), libc::EINVAL);
            b.co_truncate(grown).expect("grow");
        });
        assert_eq!(blk.size(), grown);
        oracle.resize(grown as usize, 0);
        random_writes(&blk, &mut oracle, cs + 31, 20);
        let b = blk.clone();
        let small = 2 * MIB + 1024;
        co(move || {
            b.co_pdiscard(small, grown - small)
                .expect("discard the tail");
        });
        // Discard is per whole cluster: bytes of a partial cluster stay. Write zeros there.
        let b = blk.clone();
        co(move || {
            b.co_pwrite_zeroes(small, grown - small, true)
                .expect("zero the tail");
            b.co_truncate(small).expect("shrink");
        });
        oracle.truncate(small as usize);
        assert_eq!(blk.size(), small);
        assert!(read_back(&blk) == oracle, "bytes after truncate");
        close(blk);
        check_clean(&path);
        compare(&path, &oracle);
        let info = run(Command::new("qemu-img").arg("info").arg(&path));
        assert!(info.contains(&format!("{small} bytes")), "{info}");
        if cs == 512 {
            assert_ne!(be64_at(&path, 40), l1_before, "the L1 table was moved");
        }
    }
}

/// Growing from a size that is not a multiple of the cluster size: the rest of the old last
/// cluster (written before, then cut off by a shrink) reads zeros again.
#[test]
fn grow_zeroes_the_old_tail() {
    if !have_qemu("grow_zeroes_the_old_tail") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "tail.qcow2", "cluster_size=65536", MIB);
    qemu_io("qcow2", &path, &["write -P 0x77 0 1M"]);
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || {
        b.co_pdiscard(65536, MIB - 65536).expect("discard");
        b.co_truncate(1024).expect("shrink into the first cluster");
        b.co_truncate(MIB).expect("grow again");
    });
    let mut oracle = vec![0u8; MIB as usize];
    oracle[..1024].fill(0x77);
    assert!(read_back(&blk) == oracle);
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
}

/// qcow2 sizes are sectors, as QEMU reads them: a header size that is not a multiple of 512 is
/// read rounded down (what `qemu-img info` shows for the same file), and a truncate to such a
/// size is refused (EINVAL, as QEMU's "The new size must be a multiple of 512") and changes
/// nothing, where writing the bytes to the header would lose them at the next open.
#[test]
fn sizes_are_sectors_as_qemu_reads_them() {
    if !have_qemu("sizes_are_sectors_as_qemu_reads_them") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "s.qcow2", "cluster_size=65536", MIB);
    patch(&path, 24, &(MIB + 700).to_be_bytes());
    // The first "virtual size: 1 MiB (1049088 bytes)" line is the image's (children follow).
    let qemu_size = |path: &Path| -> u64 {
        let info = run(Command::new("qemu-img").arg("info").arg(path));
        let line = info.lines().find(|l| l.starts_with("virtual size:"));
        let bytes = line.and_then(|l| l.split('(').nth(1)?.split(' ').next()?.parse().ok());
        bytes.expect("qemu-img info prints the virtual size in bytes")
    };
    assert_eq!(qemu_size(&path), MIB + 512, "the oracle rounds down");
    let blk = open_rw(&path);
    assert_eq!(blk.size(), MIB + 512, "read as QEMU reads it");
    assert_eq!(blk.size_granularity(), 512);
    let b = blk.clone();
    co(move || {
        let e = b
            .co_truncate(MIB + 1000)
            .expect_err("not a multiple of 512");
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert_eq!(b.size(), MIB + 512, "a refused truncate changes nothing");
        b.co_truncate(MIB + 1024).expect("a whole sector");
    });
    close(blk);
    check_clean(&path);
    assert_eq!(qemu_size(&path), MIB + 1024);
    assert_eq!(be64_at(&path, 24), MIB + 1024);
}

/// Runs qemu-io on `path` with lazy refcounts and kills it (`abort`) after `cmds`: the image is
/// left dirty, its refcounts behind its tables (`qemu-img check` exit code 2, errors) or ahead
/// of them (3, leaks); returns which. Runs in the image's directory (a core dump, if the
/// machine writes one, lands there).
fn crash_with_lazy_refcounts(path: &Path, cmds: &[&str]) -> i32 {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(path.parent().expect("a directory"));
    cmd.args(["-f", "qcow2"]);
    for c in cmds.iter().chain(&["abort"]) {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().expect("run qemu-io");
    assert!(!out.status.success(), "qemu-io was to abort");
    assert_eq!(be64_at(path, 72) & 1, 1, "the crash left the dirty bit");
    let (code, out) = qemu_img_check(path);
    let code = code.unwrap_or(-1);
    assert!(
        code == 2 || code == 3,
        "the crash left wrong refcounts: {out}"
    );
    code
}

/// QEMU with lazy refcounts crashes after allocating writes over two internal snapshots
/// (copy-on-write), zero writes and compressed writes: the image is dirty and `qemu-img check`
/// finds errors or leaks. A writable open rebuilds the refcounts and clears the bit; then
/// writes, and the image checks clean, reads as the oracle, and each snapshot still reverts to
/// what it held. 512-byte clusters go through O_DIRECT (`cache=none`): every metadata write of
/// the repair is padded.
#[test]
fn dirty_image_from_a_crash_is_repaired() {
    if !have_qemu("dirty_image_from_a_crash_is_repaired") {
        return;
    }
    let dir = disk_dir();
    let mut errors = 0;
    for (cs, cache) in [
        (4096u64, block::CacheMode::default()),
        (65536, block::CacheMode::default()),
        (512, block::CacheMode::None),
    ] {
        let size = 16 * MIB;
        let path = create_qcow2(
            dir.path(),
            &format!("lazy-{cs}.qcow2"),
            &format!("cluster_size={cs},lazy_refcounts=on"),
            size,
        );
        // Two snapshots: the entries of the snapshot table are padded to 8 bytes.
        let mut snaps = Vec::new();
        for (name, cmds) in [
            ("s1", ["write -P 0x11 0 3M", "write -c -P 0x44 4M 128k"]),
            (
                "second-snapshot",
                ["write -P 0x33 2M 1M", "write -c -P 0x45 6M 128k"],
            ),
        ] {
            qemu_io("qcow2", &path, &cmds);
            snapshot(&path, "-c", name);
            snaps.push((name, oracle_bytes(&path)));
        }
        let code = crash_with_lazy_refcounts(
            &path,
            &[
                // After a compressed write QEMU's refcounts were found written back: it goes
                // first, so that the writes after it leave the refcounts behind.
                "write -c -P 0x55 10M 128k",
                "write -P 0x22 1M 3M",
                "write -z 8M 1M",
                "write -P 0x66 12M 1M",
            ],
        );
        errors += usize::from(code == 2);
        let mut oracle = oracle_bytes(&path);
        let opts = OpenOptions {
            cache,
            ..OpenOptions::default()
        };
        let blk = match open_image(&path, &opts) {
            Ok(b) => b,
            Err(e) if cache == block::CacheMode::None && e.errno() == libc::EINVAL => {
                skip(
                    "dirty_image_from_a_crash_is_repaired",
                    &format!("no O_DIRECT here: {e}"),
                );
                continue;
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        assert_eq!(be64_at(&path, 72) & 1, 0, "the dirty bit is cleared");
        random_writes(&blk, &mut oracle, cs + 1, 40);
        concurrent_stripes(&blk, &mut oracle, cs + 2, 2);
        close(blk);
        check_clean(&path);
        compare(&path, &oracle);
        for (name, snap) in snaps.iter().rev() {
            snapshot(&path, "-a", name);
            check_clean(&path);
            compare(&path, snap);
        }
    }
    assert!(
        errors > 0,
        "no crash left referenced clusters with too low refcounts"
    );
}

/// A dirty image whose active L1 and L2 entries say COPIED (ours alone) for an L2 table and a
/// data cluster an internal snapshot shares: the repair clears the flags, so a write copies
/// the table and the cluster instead of changing the snapshot's in place.
#[test]
fn dirty_image_copied_flags_are_fixed() {
    if !have_qemu("dirty_image_copied_flags_are_fixed") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "copied.qcow2", "cluster_size=65536", 4 * MIB);
    qemu_io("qcow2", &path, &["write -P 0x11 0 1M"]);
    snapshot(&path, "-c", "s1");
    let snap = oracle_bytes(&path);
    let l1 = be64_at(&path, 40);
    let l1_entry = be64_at(&path, l1);
    let l2 = l1_entry & 0x00ff_ffff_ffff_fe00;
    let entry = be64_at(&path, l2);
    assert_eq!((l1_entry | entry) >> 63, 0, "shared: COPIED clear");
    patch(&path, l1, &(l1_entry | 1 << 63).to_be_bytes());
    patch(&path, l2, &(entry | 1 << 63).to_be_bytes());
    patch(&path, 79, &[1]); // dirty
    let mut oracle = snap.clone();
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || b.co_pwrite(4096, &[0x77; 4096]).expect("write"));
    oracle[4096..8192].fill(0x77);
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
    snapshot(&path, "-a", "s1");
    compare(&path, &snap);
}

/// The repair is redone from scratch when it is interrupted: the header write that switches to
/// the new refcount table fails, or the one that clears the dirty bit (the open fails, the
/// image stays dirty), and the next open repairs it. And a dirty image the repair cannot handle — bitmaps, an entry pointing past the
/// end of the file — is refused with a message and not written to.
#[test]
fn dirty_image_repair_interrupted_or_refused() {
    if !have_qemu("dirty_image_repair_interrupted_or_refused") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "lazy.qcow2", "lazy_refcounts=on", 8 * MIB);
    assert_eq!(crash_with_lazy_refcounts(&path, &["write -P 0x22 0 3M"]), 2);
    let oracle = oracle_bytes(&path);
    // The header switch to the new refcount table fails; then the clearing of the dirty bit,
    // once the image points to a structure of ours.
    for range in [48..60, 72..80] {
        let file = block::FileDriver::open(&path, &block::FileOptions::default()).expect("open");
        let dbg = Arc::new(block::BlkdebugDriver::new(Arc::new(file)));
        dbg.add_rule(block::Rule::new(block::BlkdebugOp::Write).range(range.clone()));
        let e = block::Qcow2Driver::open(dbg.clone())
            .err()
            .expect("the header write fails");
        assert_eq!(e.errno(), libc::EIO, "{range:?}: {e}");
        drop(dbg);
        assert_eq!(be64_at(&path, 72) & 1, 1, "{range:?}: still dirty");
    }
    let blk = open_rw(&path);
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);

    let bitmaps = create_qcow2(dir.path(), "bitmaps.qcow2", "lazy_refcounts=on", 8 * MIB);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&bitmaps)
        .arg("b0"));
    crash_with_lazy_refcounts(&bitmaps, &["write -P 0x22 0 1M"]);
    // An L2 entry (of guest 1 MiB) pointing far past the end of the file.
    let past = create_qcow2(dir.path(), "past.qcow2", "lazy_refcounts=on", 8 * MIB);
    crash_with_lazy_refcounts(&past, &["write -P 0x22 0 64k"]);
    let l2 = be64_at(&past, be64_at(&past, 40)) & 0x00ff_ffff_ffff_fe00;
    patch(
        &past,
        l2 + 16 * 8,
        &(0x8000_0000_4000_0000u64).to_be_bytes(),
    );
    for (path, want) in [(&bitmaps, "bitmaps"), (&past, "not inside the file")] {
        let before = std::fs::read(path).expect("read the image");
        let e = open_image(path, &OpenOptions::default()).expect_err("refused");
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
        assert!(
            std::fs::read(path).expect("read") == before,
            "the image was written to"
        );
        let ro = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        open_image(path, &ro).expect("read-only open still works");
    }
}

/// 8-bit refcounts are refused for writing with a message saying what to do, and still open
/// read-only.
#[test]
fn writable_open_refusals() {
    if !have_qemu("writable_open_refusals") {
        return;
    }
    let dir = disk_dir();
    let narrow = create_qcow2(dir.path(), "rc8.qcow2", "refcount_bits=8", MIB);
    for (path, want) in [(&narrow, "refcount_bits=8")] {
        for format in [Format::Auto, Format::Qcow2] {
            let opts = OpenOptions {
                format,
                ..OpenOptions::default()
            };
            let e = open_image(path, &opts).expect_err("writable open refused");
            assert!(matches!(e, BlockError::Invalid(_)), "{e}");
            assert!(e.to_string().contains(want), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        let ro = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let blk = open_image(path, &ro).expect("read-only open still works");
        assert_eq!(read_back(&blk), vec![0u8; MIB as usize]);
    }
}

/// An L2 entry pointing past the end of the file: the write fails with EIO, the image is
/// marked corrupt (header bit) and later writes are refused; reads of other clusters work.
#[test]
fn corrupt_entry_stops_writes() {
    if !have_qemu("corrupt_entry_stops_writes") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "bad.qcow2", "cluster_size=65536", 4 * MIB);
    qemu_io(
        "qcow2",
        &path,
        &["write -P 0xab 1M 64k", "write -P 0xcd 2M 64k"],
    );
    let l1 = be64_at(&path, 40);
    let l2 = be64_at(&path, l1) & 0x00ff_ffff_ffff_fe00;
    patch(
        &path,
        l2 + 16 * 8,
        &((1u64 << 63) | (1u64 << 40)).to_be_bytes(),
    );
    let len_before = std::fs::metadata(&path).expect("stat").len();
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || {
        let e = b.co_pwrite(MIB + 100, &[1u8; 100]).expect_err("bad entry");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        let e = b
            .co_pwrite(3 * MIB, &[1u8; 100])
            .expect_err("image is corrupt now");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        let mut buf = vec![0u8; 4096];
        b.co_pread(2 * MIB, &mut buf)
            .expect("other clusters still read");
        assert!(buf.iter().all(|&x| x == 0xcd));
    });
    close(blk);
    assert!(std::fs::metadata(&path).expect("stat").len() <= len_before + 65536);
    assert_ne!(be64_at(&path, 72) & 2, 0, "the corrupt bit is set");
    let e = open_image(&path, &OpenOptions::default()).expect_err("corrupt bit");
    assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
}

/// An image written by QEMU with several L2 tables, then opened with tiny caches: every
/// table and refcount block is evicted and re-read many times.
#[test]
fn tiny_caches() {
    if !have_qemu("tiny_caches") {
        return;
    }
    let dir = disk_dir();
    let size = 8 * MIB;
    let path = create_qcow2(dir.path(), "tiny.qcow2", "cluster_size=4096", size);
    let child: Arc<dyn block::BlockDriver> = Arc::new(
        block::FileDriver::open(&path, &block::FileOptions::default()).expect("open the file"),
    );
    let opts = block::Qcow2Options {
        l2_cache_bytes: 1,
        refcount_cache_bytes: 1,
    };
    let q = block::Qcow2Driver::open_with(child, &opts).expect("open qcow2");
    let blk = Arc::new(
        BlockBackend::new(Arc::new(q), block::BackendOptions::default()).expect("backend"),
    );
    let mut oracle = vec![0u8; size as usize];
    random_writes(&blk, &mut oracle, 99, 50);
    concurrent_stripes(&blk, &mut oracle, 98, 2);
    // More writers than the cache has tables: links pin tables past the capacity.
    concurrent_stripes(&blk, &mut oracle, 97, 4);
    assert!(read_back(&blk) == oracle);
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
}

/// With `cache=none` (O_DIRECT) the driver's small metadata writes and unaligned data writes go
/// through the padding (read-modify-write) of its private backend over the file.
#[test]
fn cache_none_small_clusters() {
    if !have_qemu("cache_none_small_clusters") {
        return;
    }
    let dir = disk_dir();
    for cs in [512u64, 65536] {
        let size = 6 * MIB;
        let path = create_qcow2(
            dir.path(),
            &format!("direct-{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            size,
        );
        let opts = OpenOptions {
            cache: block::CacheMode::None,
            ..OpenOptions::default()
        };
        let blk = match open_image(&path, &opts) {
            Ok(b) => b,
            Err(e) => {
                skip(
                    "cache_none_small_clusters",
                    &format!("no O_DIRECT here: {e}"),
                );
                return;
            }
        };
        let mut oracle = vec![0u8; size as usize];
        random_writes(&blk, &mut oracle, cs + 40, 40);
        concurrent_stripes(&blk, &mut oracle, cs + 41, 2);
        zeroes_and_discards(&blk, &mut oracle, cs, cs + 42);
        assert!(read_back(&blk) == oracle);
        close(blk);
        check_clean(&path);
        compare(&path, &oracle);
    }
}

/// Dropped without a flush (as if the process died): the reserved clusters and the deferred
/// frees show up as leaks (`qemu-img check` exit 3, never 2), every write is there, and
/// `qemu-img check -r leaks` makes the image clean.
#[test]
fn unflushed_image_leaks_at_worst() {
    if !have_qemu("unflushed_image_leaks_at_worst") {
        return;
    }
    let dir = disk_dir();
    let size = 8 * MIB;
    let path = create_qcow2(dir.path(), "unflushed.qcow2", "cluster_size=4096", size);
    qemu_io("qcow2", &path, &["write -P 0x61 0 2M"]);
    let mut oracle = oracle_bytes(&path);
    let blk = open_rw(&path);
    random_writes(&blk, &mut oracle, 123, 30);
    zeroes_and_discards(&blk, &mut oracle, 4096, 124);
    drop(blk); // no close, no flush
    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(3), "leaks expected, not errors: {text}");
    assert!(text.contains("leaked clusters"), "{text}");
    compare(&path, &oracle);
    run(Command::new("qemu-img")
        .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
        .arg(&path));
    check_clean(&path);
    compare(&path, &oracle);
}

/// Many coroutines on several threads write the *same* bytes (a fixed pattern of the offset)
/// over overlapping random ranges of an empty image, so the expected content is known whatever
/// the interleaving; then everything is discarded and the next round starts on unallocated
/// clusters again. Two writers of one unallocated cluster must not both allocate it: the
/// loser's cluster would be leaked, or its link would drop the winner's data — `qemu-img
/// check` and the comparisons catch either.
#[test]
fn overlapping_concurrent_writes_allocate_once() {
    if !have_qemu("overlapping_concurrent_writes_allocate_once") {
        return;
    }
    let dir = disk_dir();
    for cs in [512u64, 65536] {
        let size = 16 * cs;
        let path = create_qcow2(
            dir.path(),
            &format!("overlap-{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            size,
        );
        let pattern: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i * 7 % 251) as u8 + 1).collect());
        // O_DIRECT: data writes go to the thread pool, so a writer yields between planning and
        // linking and others run in that window (page-cache writes may complete inline).
        let direct = OpenOptions {
            cache: block::CacheMode::None,
            ..OpenOptions::default()
        };
        let blk = open_image(&path, &direct).unwrap_or_else(|_| open_rw(&path));
        let iothreads: Vec<runtime::IoThread> = (0..3)
            .map(|t| runtime::IoThread::spawn(&format!("o{t}")).expect("iothread"))
            .collect();
        let mut rng = XorShift(cs + 50);
        let mut oracle = Vec::new();
        for round in 0..15 {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut written = vec![false; size as usize];
            for w in 0..12 {
                let mut job = Vec::new();
                for _ in 0..6 {
                    let off = rng.below(size);
                    let len = (1 + rng.below(2 * cs)).min(size - off);
                    written[off as usize..(off + len) as usize].fill(true);
                    job.push((off, len));
                }
                let (b, tx, pattern) = (blk.clone(), tx.clone(), pattern.clone());
                iothreads[w % 3].spawn_co(move || {
                    let mut res = Ok(());
                    for (off, len) in job {
                        let data = &pattern[off as usize..(off + len) as usize];
                        if let Err(e) = b.co_pwrite(off, data) {
                            res = Err(format!("write {off}+{len}: {e}"));
                            break;
                        }
                    }
                    let _ = tx.send(res);
                });
            }
            drop(tx);
            for r in rx.iter() {
                r.expect("a concurrent write failed");
            }
            oracle = written
                .iter()
                .zip(pattern.iter())
                .map(|(&w, &p)| if w { p } else { 0 })
                .collect();
            assert!(
                read_back(&blk) == oracle,
                "cluster {cs} round {round}: bytes differ"
            );
            if round < 14 {
                let b = blk.clone();
                co(move || b.co_pdiscard(0, size).expect("discard everything"));
            }
        }
        for t in iothreads {
            t.stop();
        }
        close(blk);
        check_clean(&path);
        compare(&path, &oracle);
    }
}

/// Writes over a backing file: partial clusters are copied from the backing data (not zeros),
/// zero writes (with and without unmap) read as zeros even where the backing file has data, and
/// the backing file is never written. Both v3 (zero clusters) and v2 (zero data).
fn writes_over_backing(compat: &str) {
    let test = format!("qcow2 writes over a raw backing file, compat={compat}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    // Not a whole number of clusters (qemu-img rounds sizes to 512 bytes).
    let size = 24 * MIB + 77 * 512;
    let base = dir.path().join("base.raw");
    let mut rng = XorShift(0xbac1);
    let base_bytes = rng.bytes(size as usize);
    std::fs::write(&base, &base_bytes).expect("write the backing file");
    let path = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "-o",
        ])
        .arg(format!("cluster_size=64k,compat={compat}"))
        .arg(&path)
        .arg(size.to_string()));
    let mut oracle = base_bytes.clone();
    let blk = open_rw(&path);
    random_writes(&blk, &mut oracle, 0x70b, 50);
    let mut ops = Vec::new();
    for i in 0..10u64 {
        let off = rng.below(size);
        let len = (1 + rng.below(300_000)).min(size - off);
        oracle[off as usize..(off + len) as usize].fill(0);
        ops.push((off, len, i % 2 == 0));
    }
    let b = blk.clone();
    co(move || {
        for (off, len, unmap) in ops {
            b.co_pwrite_zeroes(off, len, unmap)
                .unwrap_or_else(|e| panic!("write zeroes {off}+{len}: {e}"));
        }
    });
    random_writes(&blk, &mut oracle, 0x70c, 20);
    assert!(read_back(&blk) == oracle, "{test}: bytes read back differ");
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
    assert!(
        std::fs::read(&base).expect("read the backing file") == base_bytes,
        "{test}: the backing file changed"
    );
}

#[test]
fn writes_over_a_backing_file_v3() {
    writes_over_backing("1.1");
}

#[test]
fn writes_over_a_backing_file_v2() {
    writes_over_backing("0.10");
}

/// Growing an image over a longer backing file: the new range reads as zeros, not as the
/// backing file's data — from the created size, and again after a shrink to an unaligned size
/// (whose last cluster keeps the backing data below the size; a v2 discard lets the backing
/// file show through again). Both v3 and v2.
fn grow_over_longer_backing(compat: &str) {
    let test = format!("qcow2 grow over a longer backing file, compat={compat}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let base = dir.path().join("base.raw");
    let base_bytes = XorShift(0x9e0).bytes(8 * MIB as usize);
    std::fs::write(&base, &base_bytes).expect("write the backing file");
    let path = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "-o",
        ])
        .arg(format!("cluster_size=64k,compat={compat}"))
        .arg(&path)
        .arg("4M"));
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || b.co_truncate(8 * MIB).expect("grow to 8 MiB"));
    let mut oracle = base_bytes.clone();
    oracle[4 * MIB as usize..].fill(0);
    assert!(read_back(&blk) == oracle, "{test}: [4M, 8M) after a grow");
    let shrunk = 2 * MIB + 1536;
    let b = blk.clone();
    co(move || {
        // v2 zeroed with data clusters: a shrink keeps only unallocated and zero ones.
        b.co_pdiscard(4 * MIB, 4 * MIB).expect("discard");
        b.co_truncate(shrunk).expect("shrink");
        b.co_truncate(8 * MIB).expect("grow again");
    });
    oracle[shrunk as usize..].fill(0);
    assert!(
        read_back(&blk) == oracle,
        "{test}: after a shrink and a grow"
    );
    close(blk);
    check_clean(&path);
    compare(&path, &oracle);
    assert!(
        std::fs::read(&base).expect("read the backing file") == base_bytes,
        "{test}: the backing file changed"
    );
}

#[test]
fn grow_over_a_longer_backing_file_v3() {
    grow_over_longer_backing("1.1");
}

#[test]
fn grow_over_a_longer_backing_file_v2() {
    grow_over_longer_backing("0.10");
}

/// A refcount table whose first entry is zero (the block counting the header is missing): the
/// first allocation would create that block at offset 0, over the header. The write fails with
/// EIO instead, the image is marked corrupt, and the header is untouched but for that bit.
#[test]
fn missing_first_refcount_block_spares_the_header() {
    if !have_qemu("missing_first_refcount_block_spares_the_header") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "noref.qcow2", "cluster_size=65536", 4 * MIB);
    patch(&path, be64_at(&path, 48), &[0u8; 8]);
    let head = |path: &Path| std::fs::read(path).expect("read the image")[..512].to_vec();
    let mut before = head(&path);
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || {
        let e = b
            .co_pwrite(MIB, &[1u8; 4096])
            .expect_err("no place for the block");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        assert_eq!(e.errno(), libc::EIO);
    });
    drop(blk);
    before[79] |= 2; // the corrupt bit
    assert!(head(&path) == before, "the header changed");
}

/// The file, except that one write overlapping `range` reports EIO *after* it reached the file
/// (a write that landed and still failed, or landed in part).
struct LandThenFail {
    file: block::FileDriver,
    range: std::ops::Range<u64>,
    /// Whether the failing write reaches the file first (else it fails without writing).
    land: bool,
    fired: std::sync::atomic::AtomicBool,
}

impl block::BlockDriver for LandThenFail {
    fn format_name(&self) -> &'static str {
        "file"
    }
    fn getlength(&self) -> u64 {
        self.file.getlength()
    }
    fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }
    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> block::Result<()> {
        self.file.co_preadv(offset, buf)
    }
    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> block::Result<()> {
        let hit = offset < self.range.end && offset + buf.len() as u64 > self.range.start;
        let fail = hit && !self.fired.swap(true, std::sync::atomic::Ordering::Relaxed);
        if self.land || !fail {
            self.file.co_pwritev(offset, buf)?;
        }
        if fail {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }
    fn co_flush(&self) -> block::Result<()> {
        self.file.co_flush()
    }
    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> block::Result<()> {
        self.file.co_pwrite_zeroes(offset, len, may_unmap)
    }
    fn co_pdiscard(&self, offset: u64, len: u64) -> block::Result<()> {
        self.file.co_pdiscard(offset, len)
    }
    fn co_block_status(&self, offset: u64, len: u64) -> block::Result<(block::BlockStatus, u64)> {
        self.file.co_block_status(offset, len)
    }
    fn co_truncate(&self, size: u64) -> block::Result<()> {
        self.file.co_truncate(size)
    }
    fn close(&self) -> block::Result<()> {
        self.file.close()
    }
}

/// A write that was to link new clusters (an L2 entry, an L1 entry, the header's L1 fields)
/// reached the file but failed: the clusters may be referenced now, so they must not be freed
/// (`qemu-img check` would find a referenced cluster with refcount 0). Leaks at worst. And an
/// L2 link that failed without reaching the file must not stay in the cache (the cached table
/// was changed before the write): the driver then reads what the file says.
#[test]
fn failed_link_write_never_frees() {
    if !have_qemu("failed_link_write_never_frees") {
        return;
    }
    let dir = disk_dir();
    let l2_image = create_qcow2(dir.path(), "l2.qcow2", "cluster_size=65536", 4 * MIB);
    qemu_io("qcow2", &l2_image, &["write -P 0x11 0 64k"]);
    let l2 = be64_at(&l2_image, be64_at(&l2_image, 40)) & 0x00ff_ffff_ffff_fe00;
    let l1_image = create_qcow2(dir.path(), "l1.qcow2", "cluster_size=65536", 4 * MIB);
    let l1 = be64_at(&l1_image, 40);
    let grow_image = create_qcow2(dir.path(), "grow.qcow2", "cluster_size=65536", 4 * MIB);
    let lost_image = dir.path().join("lost.qcow2");
    std::fs::copy(&l2_image, &lost_image).expect("copy the image");
    // The L2 entry of guest 1 MiB (landed, then not); L1 entry 0; the header's l1_size and
    // l1_table_offset.
    let cases = [
        (&l2_image, l2 + 16 * 8..l2 + 17 * 8, true, false),
        (&lost_image, l2 + 16 * 8..l2 + 17 * 8, false, false),
        (&l1_image, l1..l1 + 8, true, false),
        (&grow_image, 36..48, true, true),
    ];
    for (path, range, land, grow) in cases {
        let file = block::FileDriver::open(path, &block::FileOptions::default()).expect("open");
        let child = LandThenFail {
            file,
            range: range.clone(),
            land,
            fired: Default::default(),
        };
        let q = block::Qcow2Driver::open(Arc::new(child)).expect("open qcow2");
        let blk = Arc::new(
            BlockBackend::new(Arc::new(q), block::BackendOptions::default()).expect("backend"),
        );
        let b = blk.clone();
        let seen = co(move || {
            if grow {
                let e = b
                    .co_truncate(MIB << 10)
                    .expect_err("the header write fails");
                assert_eq!(e.errno(), libc::EIO, "{e}");
                return None;
            }
            let e = b
                .co_pwrite(MIB, &[0x5a; 65536])
                .expect_err("the link fails");
            assert_eq!(e.errno(), libc::EIO, "{e}");
            // Whatever part landed, the driver must now map the range as the file does: what
            // it reads must be what a reopen reads.
            let mut seen = vec![0u8; 65536];
            b.co_pread(MIB, &mut seen)
                .expect("read after the failed write");
            Some(seen)
        });
        close(blk);
        if let Some(seen) = seen {
            let file = oracle_bytes(path);
            assert!(
                file[MIB as usize..(MIB + 65536) as usize] == seen[..],
                "{} ({range:?}): the driver's view after the failed link differs from the file's",
                path.display()
            );
        }
        let (code, out) = qemu_img_check(path);
        assert!(
            matches!(code, Some(0 | 3)),
            "{} ({range:?}): no errors, leaks at worst: {out}",
            path.display()
        );
    }
}

/// A qcow2 driver over blkdebug over the file, with the blkdebug node to add rules to.
fn open_over_blkdebug(path: &Path) -> (Arc<BlockBackend>, Arc<block::BlkdebugDriver>) {
    let file = block::FileDriver::open(path, &block::FileOptions::default()).expect("open");
    let dbg = Arc::new(block::BlkdebugDriver::new(Arc::new(file)));
    let q = block::Qcow2Driver::open(dbg.clone()).expect("open qcow2");
    let blk = BlockBackend::new(Arc::new(q), block::BackendOptions::default()).expect("backend");
    (Arc::new(blk), dbg)
}

/// A flush does not hold the metadata lock across its `fdatasync` (a read that needs the lock
/// completes while the flush waits), and keeps the reserve: the next allocating write needs no
/// new reservation, hence no `fdatasync` (they all fail now). Closing returns the reserve: the
/// image checks clean.
#[test]
fn flush_keeps_the_reserve_and_the_lock_free() {
    if !have_qemu("flush_keeps_the_reserve_and_the_lock_free") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "flush.qcow2", "cluster_size=65536", 8 * MIB);
    let (blk, dbg) = open_over_blkdebug(&path);
    let (b, d) = (blk.clone(), dbg.clone());
    co(move || {
        b.co_pwrite(0, &[0x33; 65536]).expect("allocating write");
        b.co_pdiscard(0, 65536).expect("a deferred free");
        let slow = block::Rule::new(block::BlkdebugOp::Flush)
            .errno(0)
            .delay(std::time::Duration::from_millis(300));
        let slow = d.add_rule(slow);
        let b2 = b.clone();
        let flush = runtime::spawn(move || b2.co_flush());
        let b3 = b.clone();
        // An unallocated cluster: no I/O, only the metadata lock.
        let read = runtime::spawn(move || {
            let mut buf = [1u8; 512];
            b3.co_pread(4 * MIB, &mut buf).map(|()| buf)
        });
        assert!(read.is_finished(), "the read waited for the flush");
        assert!(matches!(read.join(), Ok(Ok(buf)) if buf == [0u8; 512]));
        assert!(matches!(flush.join(), Ok(Ok(()))));
        d.remove_rule(slow);
        d.add_rule(block::Rule::new(block::BlkdebugOp::Flush));
        b.co_pwrite(MIB, &[0x44; 65536])
            .expect("an allocating write after a flush needs no fdatasync");
        d.clear_rules();
    });
    close(blk);
    drop(dbg);
    check_clean(&path);
    let mut oracle = vec![0u8; 8 * MIB as usize];
    oracle[MIB as usize..(MIB + 65536) as usize].fill(0x44);
    compare(&path, &oracle);
}

/// An image with 4 KiB clusters (each L2 table maps 2 MiB): guest 0 (0x11) and 8k (0x33) in
/// the table of L1 entry 0, 4 MiB (0x22) in that of L1 entry 2. Opened over blkdebug with a
/// one-table L2 cache (1 byte rounds up to one table). Also returns the first table's offset.
fn held_link_image(
    dir: &Path,
) -> (
    std::path::PathBuf,
    u64,
    Arc<BlockBackend>,
    Arc<block::BlkdebugDriver>,
) {
    let path = create_qcow2(dir, "held.qcow2", "cluster_size=4096", 8 * MIB);
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 0x11 0 4k",
            "write -P 0x33 8k 4k",
            "write -P 0x22 4M 4k",
        ],
    );
    let l2 = be64_at(&path, be64_at(&path, 40)) & 0x00ff_ffff_ffff_fe00;
    let file = block::FileDriver::open(&path, &block::FileOptions::default()).expect("open");
    let dbg = Arc::new(block::BlkdebugDriver::new(Arc::new(file)));
    let opts = block::Qcow2Options {
        l2_cache_bytes: 1,
        refcount_cache_bytes: 1,
    };
    let q = block::Qcow2Driver::open_with(dbg.clone(), &opts).expect("open qcow2");
    let blk = Arc::new(
        BlockBackend::new(Arc::new(q), block::BackendOptions::default()).expect("backend"),
    );
    (path, l2, blk, dbg)
}

/// Starts an allocating write of 0x77 to guest 4k and returns once it is held in the write of
/// its L2 entry (the table at `l2` changed in the cache, pinned, the lock released), with the
/// gate that lets it go on.
fn hold_link_of_4k(
    b: &Arc<BlockBackend>,
    d: &block::BlkdebugDriver,
    l2: u64,
) -> (runtime::JoinHandle<block::Result<()>>, block::Gate) {
    let gate = block::Gate::new();
    let hold = block::Rule::new(block::BlkdebugOp::Write)
        .range(l2 + 8..l2 + 16)
        .errno(0)
        .hold(&gate)
        .once();
    let hold = d.add_rule(hold);
    let b1 = b.clone();
    let writer = runtime::spawn(move || b1.co_pwrite(4096, &[0x77; 4096]));
    let start = std::time::Instant::now();
    while d.has_rule(hold) {
        assert!(start.elapsed().as_secs() < 30, "the link write never came");
        runtime::co_sleep(std::time::Duration::from_millis(1));
    }
    (writer, gate)
}

/// An allocating write changes its L2 table in the cache and writes the new entry after
/// releasing the metadata lock. While that write is held, a one-table cache has to load
/// another table, and a discard in the same table fails its L2 write: neither may drop the
/// changed table (a reload from the file would lose the new entry, and the cluster just
/// written would read as a hole — or be allocated twice).
#[test]
fn held_link_survives_eviction_and_a_failed_discard() {
    if !have_qemu("held_link_survives_eviction_and_a_failed_discard") {
        return;
    }
    let dir = disk_dir();
    let (path, l2, blk, dbg) = held_link_image(dir.path());
    let (b, d) = (blk.clone(), dbg.clone());
    co(move || {
        let read = |offset: u64| {
            let mut buf = vec![0u8; 4096];
            b.co_pread(offset, &mut buf).expect("read");
            buf
        };
        let (writer, gate) = hold_link_of_4k(&b, &d, l2);
        // The cache holds one table: loading the other one must not evict the held one.
        assert!(read(4 * MIB) == [0x22; 4096]);
        // A discard of guest 8k whose L2 write fails, in the held table.
        d.add_rule(
            block::Rule::new(block::BlkdebugOp::Write)
                .range(l2 + 16..l2 + 24)
                .errno(libc::EIO)
                .once(),
        );
        let e = b
            .co_pdiscard(8192, 4096)
            .expect_err("the discard's L2 write fails");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(read(0) == [0x11; 4096]);
        assert!(
            read(8192) == [0x33; 4096],
            "the failed discard changed nothing"
        );
        assert!(!writer.is_finished(), "the link write was held throughout");
        gate.open();
        assert!(matches!(writer.join(), Ok(Ok(()))));
        // Whatever the driver kept of the table is what it maps guest 4k with.
        assert!(
            read(4096) == [0x77; 4096],
            "the linked cluster reads its new data"
        );
    });
    close(blk);
    drop(dbg);
    check_clean(&path);
    let mut oracle = vec![0u8; 8 * MIB as usize];
    oracle[..4096].fill(0x11);
    oracle[4096..8192].fill(0x77);
    oracle[8192..12288].fill(0x33);
    oracle[4 * MIB as usize..4 * MIB as usize + 4096].fill(0x22);
    compare(&path, &oracle);
}

/// As above, but reading the failed discard's entries back fails too: with a link in flight
/// the table cannot simply be dropped, its entries are unknown, so the image is marked corrupt
/// (EIO, the corrupt bit set, no more metadata writes).
#[test]
fn held_link_and_unreadable_entries_mark_the_image_corrupt() {
    if !have_qemu("held_link_and_unreadable_entries_mark_the_image_corrupt") {
        return;
    }
    let dir = disk_dir();
    let (path, l2, blk, dbg) = held_link_image(dir.path());
    let (b, d) = (blk.clone(), dbg.clone());
    co(move || {
        let (writer, gate) = hold_link_of_4k(&b, &d, l2);
        for op in [block::BlkdebugOp::Write, block::BlkdebugOp::Read] {
            d.add_rule(block::Rule::new(op).range(l2 + 16..l2 + 24).once());
        }
        let e = b.co_pdiscard(8192, 4096).expect_err("the discard fails");
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        assert!(!writer.is_finished(), "the link write was held throughout");
        gate.open();
        let _ = writer.join(); // its write was past the corrupt check: it may land
        let e = b
            .co_pwrite(6 * MIB, &[1u8; 4096])
            .expect_err("no more allocations");
        assert_eq!(e.errno(), libc::EIO, "{e}");
    });
    drop(blk);
    drop(dbg);
    assert_eq!(be64_at(&path, 72) & 2, 2, "the corrupt bit is set");
}

/// The export flushes and then drops the driver without `close`: dropped right after a flush,
/// the driver returns its reserve, and the image checks clean.
#[test]
fn flushed_then_dropped_checks_clean() {
    if !have_qemu("flushed_then_dropped_checks_clean") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "dropped.qcow2", "cluster_size=4096", 8 * MIB);
    let blk = open_rw(&path);
    let mut oracle = vec![0u8; 8 * MIB as usize];
    random_writes(&blk, &mut oracle, 77, 20);
    zeroes_and_discards(&blk, &mut oracle, 4096, 78);
    let b = blk.clone();
    co(move || b.co_flush().expect("flush"));
    drop(blk);
    check_clean(&path);
    compare(&path, &oracle);
}

/// Growing a 512-byte-cluster image so far that its L1 table needs more contiguous clusters
/// than a refcount block covers is refused at once (it used to scan the whole file space),
/// and the image stays clean.
#[test]
fn huge_l1_with_tiny_clusters_is_refused() {
    if !have_qemu("huge_l1_with_tiny_clusters_is_refused") {
        return;
    }
    let dir = disk_dir();
    let path = create_qcow2(dir.path(), "l1.qcow2", "cluster_size=512", MIB);
    let blk = open_rw(&path);
    let b = blk.clone();
    co(move || {
        let e = b
            .co_truncate(1 << 30)
            .expect_err("an L1 table of 512 clusters");
        assert!(matches!(e, BlockError::Invalid(_)), "{e}");
        b.co_truncate(256 * MIB)
            .expect("an L1 table of 128 clusters");
    });
    assert_eq!(blk.size(), 256 * MIB);
    close(blk);
    check_clean(&path);
}
