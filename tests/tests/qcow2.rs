//! qcow2 exports end to end: read-only against `qemu-img convert`, writes through the mount
//! (several threads, `dd`, hole punching, fio with verification) checked by `qemu-img check`
//! and `qemu-img compare` against an oracle, and crash safety: the daemon SIGKILLed in the
//! middle of allocating writes must leave an image that `qemu-img check` finds leaky at worst.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// `qemu-img compare` of a raw oracle with the image must say identical.
fn compare_with_oracle(path: &Path, oracle: &[u8]) {
    let raw = path.with_extension("oracle.raw");
    fs::write(&raw, oracle).unwrap();
    let out = run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(path));
    fs::remove_file(&raw).unwrap();
    assert!(out.success(), "qemu-img compare: {out}");
}

/// A qcow2 image (data, zero clusters, a compressed copy) exported read-only reads exactly what
/// `qemu-img convert -O raw` makes of it.
#[test]
fn qcow2_read_only_export_matches_qemu() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = workdir();
    let q = dir.path().join("t.qcow2");
    create_qcow2(&q, "cluster_size=4096", 16 * MIB);
    for cmd in [
        "write -P 0xab 1M 64k",
        "write -P 0x11 3000 5000",
        "write -z 1M 8k",
        "write -P 0x7e 15M 1M",
    ] {
        sh!("qemu-io", "-f", "qcow2", "-c", cmd, &q).ok();
    }
    let c = dir.path().join("c.qcow2");
    sh!("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", &q, &c).ok();
    for img in [&q, &c] {
        let raw = dir.path().join("oracle.raw");
        sh!("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, &raw).ok();
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(img, &mnt, &["-r"]);
        assert_eq!(file_size(e.path()), 16 * MIB);
        assert_same_bytes(
            &read_all(e.path()),
            &read_all(&raw),
            "qcow2 through the export",
        );
        e.stop_ok();
    }
}

/// Writes through a read-write qcow2 export — four threads on interleaved odd-sized stripes
/// (neighbours share clusters), a `dd oflag=direct`, a punched hole, a zeroed range, over data
/// QEMU wrote first — then, after a clean stop, `qemu-img check` is clean and the image equals
/// the oracle.
#[test]
fn qcow2_writes_through_the_export() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io", "dd"]));
    let dir = disk_workdir();
    for cs in ["4096", "65536"] {
        let size = 24 * MIB;
        let q = dir.path().join(format!("w-{cs}.qcow2"));
        create_qcow2(&q, &format!("cluster_size={cs}"), size);
        sh!("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2M 3M", &q).ok();
        let mut oracle = vec![0u8; size as usize];
        oracle[2 * MIB as usize..5 * MIB as usize].fill(0x5a);
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(&q, &mnt, NO_ARGS);

        let stripe = 50_001u64;
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let path = e.path().to_owned();
            handles.push(thread::spawn(move || {
                let f = open_rw(&path);
                let mut off = t * stripe;
                while off < size {
                    let len = stripe.min(size - off) as usize;
                    f.write_all_at(&random_bytes(off, len), off).unwrap();
                    off += 4 * stripe;
                }
            }));
        }
        for h in handles {
            h.join().expect("a writer thread failed");
        }
        let mut off = 0;
        while off < size {
            let len = stripe.min(size - off) as usize;
            oracle[off as usize..off as usize + len].copy_from_slice(&random_bytes(off, len));
            off += stripe;
        }

        // dd with O_DIRECT: 1 MiB requests, allocating and overwriting.
        let src = dir.path().join("dd.src");
        let dd_data = random_bytes(77, 3 * MIB as usize);
        fs::write(&src, &dd_data).unwrap();
        sh!(
            "dd",
            format!("if={}", src.display()),
            format!("of={}", e.path().display()),
            "bs=1M",
            "seek=7",
            "conv=notrunc",
            "oflag=direct",
            "status=none"
        )
        .ok();
        oracle[7 * MIB as usize..10 * MIB as usize].copy_from_slice(&dd_data);

        let f = open_rw(e.path());
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            12 * MIB + 100,
            2 * MIB,
        )
        .unwrap();
        oracle[(12 * MIB + 100) as usize..(14 * MIB + 100) as usize].fill(0);
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 20 * MIB - 3, 64 * KIB).unwrap();
        oracle[(20 * MIB - 3) as usize..(20 * MIB - 3 + 64 * KIB) as usize].fill(0);
        f.sync_all().unwrap();
        assert_same_bytes(&read_all(e.path()), &oracle, "through the export");
        drop(f);
        e.stop_ok();

        let out = qemu_img_check(&q);
        let code = out.code();
        assert_eq!(code, Some(0), "qemu-img check after a clean stop: {out}");
        compare_with_oracle(&q, &oracle);
    }
}

/// fio random writes with crc32c verification (libaio, O_DIRECT, two jobs) on a qcow2 export
/// with small clusters; then `qemu-img check` is clean.
#[test]
fn qcow2_fio_randwrite_verifies() {
    require!(
        fuse_available(),
        have_tools(&["fio", "qemu-img", "qemu-io"])
    );
    let dir = disk_workdir();
    let q = dir.path().join("fio.qcow2");
    create_qcow2(&q, "cluster_size=4096", 32 * MIB);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&q, &mnt, NO_ARGS);
    fio_randwrite_verify(dir.path(), &e, 16 * MIB);
    e.stop_ok();
    let out = qemu_img_check(&q);
    let code = out.code();
    assert_eq!(code, Some(0), "qemu-img check: {out}");
}

/// The daemon is SIGKILLed while four threads do allocating writes (and some overwrites of
/// snapshot-shared clusters); `qemu-img check` must then report leaks at worst (exit 0 or 3),
/// never corruption (exit 2), for several kill times and cluster sizes.
#[test]
fn qcow2_sigkill_mid_write_leaves_no_corruption() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = disk_workdir();
    let cases = [
        ("512", 150u64),
        ("4096", 400),
        ("65536", 250),
        ("4096", 900),
    ];
    for (round, (cs, kill_after_ms)) in cases.into_iter().enumerate() {
        let size = 48 * MIB;
        let q = dir.path().join(format!("crash-{round}.qcow2"));
        create_qcow2(&q, &format!("cluster_size={cs}"), size);
        // Shared clusters to copy on write.
        sh!("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 4M", &q).ok();
        sh!("qemu-img", "snapshot", "-c", "s1", &q).ok();
        let len_before = file_size(&q);
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(&q, &mnt, NO_ARGS);
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for t in 0..4u64 {
            let (path, stop) = (e.path().to_owned(), stop.clone());
            writers.push(thread::spawn(move || {
                let Ok(f) = fs::OpenOptions::new().write(true).open(&path) else {
                    return;
                };
                let mut rng = Prng::new(t + 1);
                let buf = random_bytes(t, 300 * KIB as usize);
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.below(size - buf.len() as u64);
                    let len = 1 + rng.below(buf.len() as u64) as usize;
                    if f.write_at(&buf[..len], off).is_err() {
                        return; // the daemon is gone
                    }
                }
            }));
        }
        // Kill while the writers are busy: once they have allocated something, a bit later.
        let started = wait_until(Duration::from_secs(20), || file_size(&q) > len_before + MIB);
        thread::sleep(Duration::from_millis(kill_after_ms));
        e.signal(libc::SIGKILL);
        let x = e.wait_exit(Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        assert!(x.is_some(), "coro-fuse did not die of SIGKILL");
        drop(e); // detaches the dead mount: blocked writers fail
        assert!(
            wait_image_unlocked(&q, Duration::from_secs(30)),
            "round {round}: the image is still locked 30 s after the daemon died"
        );
        for w in writers {
            w.join().expect("a writer thread panicked");
        }
        assert!(
            started,
            "round {round}: the writers allocated nothing in 20 s"
        );
        let out = qemu_img_check(&q);
        let code = out.code();
        eprintln!("round {round}: qemu-img check exit {code:?}");
        assert!(
            matches!(code, Some(0) | Some(3)),
            "round {round} (cluster {cs}, killed after {kill_after_ms} ms): qemu-img check \
             exit {code:?} (2 = corruption): {out}"
        );
        fs::remove_file(&q).unwrap();
    }
}

/// A growable qcow2 export: writes past the end grow the image (moving the L1 table of a
/// small-cluster image) to the next multiple of 512 bytes, `truncate` through the mount
/// shrinks it back where nothing is lost and is refused where data would be, or where the size
/// is no multiple of 512 (as in QEMU); `qemu-img` agrees afterwards.
#[test]
fn qcow2_growable_export() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let q = dir.path().join("grow.qcow2");
    create_qcow2(&q, "cluster_size=512", MIB);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&q, &mnt, &["--growable"]);
    let f = open_rw(e.path());
    let data = random_bytes(9, 100 * KIB as usize);
    let at = 5 * MIB + 77;
    f.write_all_at(&data, at).unwrap();
    let end = at + data.len() as u64;
    let grown = end.next_multiple_of(512);
    assert!(grown > end, "the test needs an unaligned end");
    assert_eq!(file_size(e.path()), grown, "grown to the next sector");
    let err = f.set_len(MIB).expect_err("shrinking over data is refused");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    let err = f.set_len(grown + 1).expect_err("a size qcow2 cannot keep");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert_eq!(
        file_size(e.path()),
        grown,
        "a refused truncate changes nothing"
    );
    f.set_len(grown + MIB).unwrap();
    drop(f);
    e.stop_ok();
    let mut oracle = vec![0u8; (grown + MIB) as usize];
    oracle[at as usize..end as usize].copy_from_slice(&data);
    let out = qemu_img_check(&q);
    let code = out.code();
    assert_eq!(code, Some(0), "qemu-img check: {out}");
    compare_with_oracle(&q, &oracle);
}

/// A writable overlay over a raw backing file, through the export: odd-sized writes copy the
/// rest of their clusters from the backing file, a punched hole reads as zeros over backing
/// data, the backing file is never written, and `qemu-img check`/`compare` agree afterwards.
#[test]
fn qcow2_overlay_writes_through_the_export() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let size = 8 * MIB;
    let base = dir.path().join("base.raw");
    let base_bytes = random_bytes(9, size as usize);
    fs::write(&base, &base_bytes).unwrap();
    let q = dir.path().join("top.qcow2");
    sh!(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        "-o",
        "cluster_size=65536",
        &q,
        size.to_string()
    )
    .ok();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&q, &mnt, NO_ARGS);
    let mut oracle = base_bytes.clone();
    let f = open_rw(e.path());
    for (i, off) in [1u64, 70_000, 3 * MIB - 5, 5 * MIB + 4097]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(100 + i as u64, 10_007 * (i + 1));
        f.write_all_at(&data, off).unwrap();
        oracle[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        6 * MIB + 3,
        300 * KIB,
    )
    .unwrap();
    oracle[(6 * MIB + 3) as usize..(6 * MIB + 3 + 300 * KIB) as usize].fill(0);
    f.sync_all().unwrap();
    assert_same_bytes(&read_all(e.path()), &oracle, "overlay through the export");
    drop(f);
    e.stop_ok();
    let out = qemu_img_check(&q);
    let code = out.code();
    assert_eq!(code, Some(0), "qemu-img check after a clean stop: {out}");
    compare_with_oracle(&q, &oracle);
    assert!(
        fs::read(&base).unwrap() == base_bytes,
        "the backing file was written"
    );
}

/// QEMU with lazy refcounts crashed after allocating writes: the image is dirty and
/// `qemu-img check` finds referenced clusters with refcount 0. Mounting it rebuilds the
/// refcounts (the log says so); writes through the export then allocate without overwriting
/// anything, and after a clean stop the image checks clean and holds what was written.
#[test]
fn qcow2_dirty_image_is_repaired_at_mount() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = disk_workdir();
    let size = 16 * MIB;
    let q = dir.path().join("lazy.qcow2");
    create_qcow2(&q, "cluster_size=4096,lazy_refcounts=on", size);
    // In the work directory: a core dump, if this machine writes one, lands there.
    run(tool("qemu-io")
        .current_dir(dir.path())
        .args(["-f", "qcow2", "-c", "write -P 0x22 1M 3M", "-c", "abort"])
        .arg(&q))
    .fails();
    let out = qemu_img_check(&q);
    let code = out.code();
    assert_eq!(code, Some(2), "the crash left refcount errors: {out}");
    let raw = dir.path().join("lazy.raw");
    sh!("qemu-img", "convert", "-f", "qcow2", "-O", "raw", &q, &raw).ok();
    let mut oracle = fs::read(&raw).unwrap();
    assert!(oracle[MIB as usize..4 * MIB as usize]
        .iter()
        .all(|&b| b == 0x22));

    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&q, &mnt, NO_ARGS);
    let f = open_rw(e.path());
    let data = random_bytes(5, 6 * MIB as usize);
    f.write_all_at(&data, 6 * MIB).unwrap();
    oracle[6 * MIB as usize..12 * MIB as usize].copy_from_slice(&data);
    f.sync_all().unwrap();
    drop(f);
    assert_same_bytes(&read_all(e.path()), &oracle, "through the export");
    let log = e.stop_ok();
    assert!(
        log.stderr.contains("rebuilding"),
        "the repair is logged: {log}"
    );

    let out = qemu_img_check(&q);
    let code = out.code();
    assert_eq!(
        code,
        Some(0),
        "qemu-img check after the repair and a clean stop: {out}"
    );
    compare_with_oracle(&q, &oracle);
}
