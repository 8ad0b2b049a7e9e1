//! Data integrity: copies in and out compared with an independent oracle (the backing file,
//! `qemu-img compare`), SEEK_DATA/SEEK_HOLE, `--offset/--size` windows, the null driver,
//! `--cache none` with unaligned requests, and many threads against an in-memory oracle.

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::thread;

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// SEEK_DATA/SEEK_HOLE through the export report the image's holes.
#[test]
fn seek_data_and_seek_hole_follow_the_image() {
    require!(fuse_available());
    let dir = workdir();
    if !supports_holes(dir.path()) {
        skip(&format!("{} has no holes", dir.path().display()));
        return;
    }
    let img = dir.path().join("holes.img");
    let size = 4 * MIB;
    sparse_image(&img, size);
    let extents = [(0, 64 * KIB), (MIB, 4 * KIB), (3 * MIB, 128 * KIB)];
    {
        let f = open_rw(&img);
        for (i, &(off, len)) in extents.iter().enumerate() {
            f.write_all_at(&random_bytes(i as u64, len as usize), off)
                .unwrap();
        }
        f.sync_all().unwrap();
        // The oracle: the backing file itself must show this layout.
        assert_eq!(seek_hole(&f, 0).unwrap(), 64 * KIB, "backing file layout");
        assert_eq!(seek_data(&f, 64 * KIB).unwrap(), MIB, "backing file layout");
    }
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["-r"]);
    let f = fs::File::open(e.path()).unwrap();
    let cases: [(u64, i32, Option<u64>); 14] = [
        (0, libc::SEEK_DATA, Some(0)),
        (0, libc::SEEK_HOLE, Some(64 * KIB)),
        (5, libc::SEEK_HOLE, Some(64 * KIB)),
        (64 * KIB, libc::SEEK_DATA, Some(MIB)),
        (100 * KIB, libc::SEEK_DATA, Some(MIB)),
        (100 * KIB, libc::SEEK_HOLE, Some(100 * KIB)),
        (MIB, libc::SEEK_HOLE, Some(MIB + 4 * KIB)),
        (MIB + 4 * KIB, libc::SEEK_DATA, Some(3 * MIB)),
        (3 * MIB + 5, libc::SEEK_DATA, Some(3 * MIB + 5)),
        (3 * MIB + 5, libc::SEEK_HOLE, Some(3 * MIB + 128 * KIB)),
        (3 * MIB + 128 * KIB, libc::SEEK_DATA, None),
        (
            3 * MIB + 128 * KIB,
            libc::SEEK_HOLE,
            Some(3 * MIB + 128 * KIB),
        ),
        (size, libc::SEEK_DATA, None),
        (size + 1, libc::SEEK_HOLE, None),
    ];
    for (off, whence, want) in cases {
        let name = if whence == libc::SEEK_DATA {
            "SEEK_DATA"
        } else {
            "SEEK_HOLE"
        };
        let got = lseek(&f, off, whence);
        match want {
            Some(w) => assert_eq!(got.as_ref().ok(), Some(&w), "lseek({off}, {name}): {got:?}"),
            None => assert_eq!(
                got.as_ref().map_err(|e| e.raw_os_error()),
                Err(Some(libc::ENXIO)),
                "lseek({off}, {name}) should be ENXIO"
            ),
        }
    }
    drop(f);
    e.stop_ok();
}

/// Copy out (`cp`, which relies on a short read at an unaligned EOF, and `qemu-img convert`)
/// and copy in (`qemu-img convert -n`), each compared with an independent copy (308 compares
/// with `qemu-img compare` the same way).
#[test]
fn copy_through_the_export_matches() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let len = 10 * MIB as usize + 12345;
    let data = random_image(&img, len, 42);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    assert_eq!(file_size(&mnt), len as u64);

    let copy = dir.path().join("copy.img");
    sh!("cp", &mnt, &copy).ok();
    assert_same_bytes(&read_all(&copy), &data, "cp out of the export");
    let converted = dir.path().join("converted.img");
    sh!("qemu-img", "convert", "-f", "raw", "-O", "raw", &mnt, &converted).ok();
    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", &converted, &img).ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");

    // qemu-img rounds image sizes up to 512 bytes and would write the padding past the end
    // of a non-growable export (QEMU's own export fails the same way): copy in at 10 MiB.
    let len = 10 * MIB as usize;
    sh!("truncate", "-s", len.to_string(), &mnt).ok();
    let src = dir.path().join("src.img");
    let newdata = random_image(&src, len, 43);
    sh!("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", &src, &mnt).ok();
    let out = sh!("qemu-img", "compare", "-f", "raw", "-F", "raw", &mnt, &src).ok();
    assert!(out.stdout.contains("Images are identical"), "{out}");
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &newdata,
        "image after qemu-img convert into the export",
    );
}

/// `--offset/--size`: a window of the image, bounded like the end of a file; nothing outside
/// it changes.
#[test]
fn offset_and_size_window() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let mut data = random_image(&img, (8 * MIB) as usize, 7);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--offset", "1M", "--size", "2M"]);
    let p = e.path().to_path_buf();
    assert_eq!(file_size(&p), 2 * MIB, "window size");
    assert_same_bytes(
        &read_all(&p),
        &data[MIB as usize..(3 * MIB) as usize],
        "window content",
    );
    let f = open_rw(&p);
    f.write_all_at(&[0xee; 4096], 0).unwrap();
    data[MIB as usize..(MIB + 4 * KIB) as usize].fill(0xee);
    assert_eq!(
        f.write_at(&[0xdd; 4096], 2 * MIB - 100).unwrap(),
        100,
        "write across the window end"
    );
    data[(3 * MIB - 100) as usize..(3 * MIB) as usize].fill(0xdd);
    assert_eq!(
        f.write_at(&[0xdd; 4096], 2 * MIB).unwrap(),
        0,
        "write at the window end"
    );
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        f.read_at(&mut buf, 2 * MIB - 10).unwrap(),
        10,
        "read across the window end"
    );
    drop(f);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after writes in the window");

    // --offset alone: to the end of the image.
    let mut e = Export::start(&img, &mnt, &["--offset", "7M", "-r"]);
    assert_eq!(file_size(e.path()), MIB);
    assert_same_bytes(
        &read_all(e.path()),
        &data[(7 * MIB) as usize..],
        "window to the end",
    );
    e.stop_ok();
}

/// `-f null --size 64M`: reads zeroes, accepts writes (and forgets them).
#[test]
fn null_driver_reads_zeroes_and_accepts_writes() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("null-co");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["-f", "null", "--size", "64M"]);
    let p = e.path().to_path_buf();
    assert_eq!(file_size(&p), 64 * MIB);
    let f = open_rw(&p);
    let mut rng = Prng::new(9);
    let mut buf = vec![0xffu8; MIB as usize];
    for _ in 0..16 {
        let off = rng.below(63 * MIB);
        let n = f.read_at(&mut buf, off).unwrap();
        assert_eq!(n, buf.len());
        assert!(buf.iter().all(|&b| b == 0), "null reads zeroes at {off}");
        buf.fill(0xff);
    }
    assert_eq!(
        f.write_at(&[0xab; 65536], 12345).unwrap(),
        65536,
        "null accepts writes"
    );
    f.sync_all().unwrap();
    assert_eq!(f.read_at(&mut buf[..65536], 12345).unwrap(), 65536);
    assert!(buf[..65536].iter().all(|&b| b == 0), "null forgets writes");
    drop(f);
    e.stop_ok();
    assert!(
        !img.exists(),
        "the null driver must not create the image path"
    );

    let mut e = Export::start(&img, &mnt, &["-f", "null"]);
    assert_eq!(file_size(e.path()), 1 << 30, "null default size");
    e.stop_ok();
}

/// Applies `ops` random reads and writes of odd sizes at odd offsets to `f`, checking reads
/// against (and applying writes to) the oracle whose stripes cover the range; stripes are
/// locked in ascending order around each I/O so overlapping requests of several threads
/// still have one well-defined result.
fn random_io(
    f: &fs::File,
    oracle: &[Mutex<Vec<u8>>],
    stripe: usize,
    size: usize,
    seed: u64,
    ops: usize,
) {
    let mut rng = Prng::new(seed);
    for i in 0..ops {
        let len = if rng.below(2) == 0 {
            rng.range(1, 8192) as usize
        } else {
            rng.range(8192, 200_000) as usize
        };
        let off = rng.below((size - len) as u64) as usize;
        let (first, last) = (off / stripe, (off + len - 1) / stripe);
        let mut guards: Vec<_> = (first..=last).map(|s| oracle[s].lock().unwrap()).collect();
        let write = rng.below(10) < 6;
        let mut buf = vec![0u8; len];
        if write {
            rng.fill(&mut buf);
            f.write_all_at(&buf, off as u64)
                .unwrap_or_else(|e| panic!("op {i}: pwrite {off}+{len}: {e}"));
        } else {
            f.read_exact_at(&mut buf, off as u64)
                .unwrap_or_else(|e| panic!("op {i}: pread {off}+{len}: {e}"));
        }
        let mut pos = off;
        while pos < off + len {
            let s = pos / stripe;
            let in_s = pos % stripe;
            let n = (stripe - in_s).min(off + len - pos);
            let o = &mut guards[s - first][in_s..in_s + n];
            let b = &buf[pos - off..pos - off + n];
            if write {
                o.copy_from_slice(b);
            } else if o != b {
                let k = o.iter().zip(b).position(|(x, y)| x != y).unwrap();
                panic!(
                    "op {i} (seed {seed}): pread {off}+{len} returned wrong data at byte {}",
                    pos + k
                );
            }
            pos += n;
        }
        if i % 50 == 49 {
            f.sync_data().unwrap();
        }
    }
}

fn oracle_bytes(oracle: &[Mutex<Vec<u8>>]) -> Vec<u8> {
    oracle
        .iter()
        .flat_map(|s| s.lock().unwrap().clone())
        .collect()
}

/// 8 threads, each with its own fd, random pwrite/pread of odd sizes and offsets through the
/// export, checked against an in-memory oracle; after a clean stop the image equals the oracle.
#[test]
fn eight_threads_random_io_against_an_oracle() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let size = 16 * MIB as usize;
    let stripe = 64 * KIB as usize;
    let data = random_image(&img, size, 8);
    let oracle: Arc<Vec<Mutex<Vec<u8>>>> = Arc::new(
        data.chunks(stripe)
            .map(|c| Mutex::new(c.to_vec()))
            .collect(),
    );
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let oracle = oracle.clone();
            let p = e.path().to_path_buf();
            thread::spawn(move || {
                let f = open_rw(&p);
                random_io(&f, &oracle, stripe, size, 1000 + t, 200);
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in threads {
        if let Err(p) = t.join() {
            failures.push(p.downcast_ref::<String>().cloned().unwrap_or_default());
        }
    }
    assert!(failures.is_empty(), "worker threads failed: {failures:#?}");
    let want = oracle_bytes(&oracle);
    assert_same_bytes(&read_all(e.path()), &want, "export after the threads");
    e.stop_ok();
    assert_same_bytes(
        &read_all(&img),
        &want,
        "image after the threads and a clean stop",
    );
}

/// `--cache none` (O_DIRECT on the image): unaligned requests still land exactly.
#[test]
fn cache_none_handles_unaligned_requests() {
    require!(fuse_available());
    let dir = disk_workdir();
    if !supports_o_direct(dir.path()) {
        skip(&format!(
            "{} does not support O_DIRECT",
            dir.path().display()
        ));
        return;
    }
    let img = dir.path().join("t.img");
    let size = 4 * MIB as usize;
    let stripe = 64 * KIB as usize;
    let data = random_image(&img, size, 77);
    let oracle: Vec<Mutex<Vec<u8>>> = data
        .chunks(stripe)
        .map(|c| Mutex::new(c.to_vec()))
        .collect();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--cache", "none"]);
    let f = open_rw(e.path());
    random_io(&f, &oracle, stripe, size, 4242, 150);
    drop(f);
    let want = oracle_bytes(&oracle);
    assert_same_bytes(&read_all(e.path()), &want, "export with --cache none");
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &want, "image with --cache none");
}

/// One 8 MiB pwrite and one 12 MiB pread (split by the kernel into max_write/max_read-sized
/// requests, 1 MiB by default) round-trip, unaligned; again with `--max-request 64K`.
#[test]
fn large_requests_round_trip() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let mut data = random_image(&img, (32 * MIB) as usize, 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let f = open_rw(e.path());
    let big = random_bytes(21, (8 * MIB) as usize);
    let at = 3 * MIB + 4097;
    assert_eq!(f.write_at(&big, at).unwrap(), big.len(), "one 8 MiB pwrite");
    data[at as usize..at as usize + big.len()].copy_from_slice(&big);
    let mut back = vec![0u8; (12 * MIB) as usize];
    assert_eq!(
        f.read_at(&mut back, MIB + 1).unwrap(),
        back.len(),
        "one 12 MiB pread"
    );
    assert_same_bytes(
        &back,
        &data[(MIB + 1) as usize..(13 * MIB + 1) as usize],
        "12 MiB pread",
    );
    drop(f);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after large requests");

    // The same with QEMU's request size (--max-request 64K): more, smaller requests.
    let mut e = Export::start(&img, &mnt, &["--max-request", "64K"]);
    let f = open_rw(e.path());
    let big = random_bytes(22, (5 * MIB) as usize);
    let at = 7 * MIB + 511;
    assert_eq!(
        f.write_at(&big, at).unwrap(),
        big.len(),
        "one 5 MiB pwrite, 64K requests"
    );
    data[at as usize..at as usize + big.len()].copy_from_slice(&big);
    let mut back = vec![0u8; (20 * MIB) as usize];
    assert_eq!(
        f.read_at(&mut back, 3).unwrap(),
        back.len(),
        "one 20 MiB pread, 64K requests"
    );
    assert_same_bytes(&back, &data[3..(20 * MIB + 3) as usize], "20 MiB pread");
    drop(f);
    e.stop_ok();
    assert_same_bytes(&read_all(&img), &data, "image after 64K requests");
}
