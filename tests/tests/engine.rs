//! `--engine coroutine|async`: the engine the suite is parametrised with (`CORO_FUSE_ENGINE`)
//! is really the one serving, and both engines give the same bytes on the same image.

use std::fs;
use std::os::unix::fs::FileExt;

use tests::*;

const KIB: usize = 1024;

/// The daemon says which engine it runs, at startup and in its exit summary; this must be the
/// engine of `CORO_FUSE_ENGINE`, so the parametrised run of the suite cannot silently test the
/// default engine only.
#[test]
fn the_engine_under_test_is_the_one_serving() {
    require!(fuse_available());
    let engine = engine_under_test();
    let dir = workdir();
    let img = dir.path().join("e.img");
    fs::write(&img, random_bytes(1, 256 * KIB)).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &[] as &[&str]);
    let f = open_rw(e.path());
    f.write_all_at(b"engine", 4096).unwrap();
    let mut back = [0u8; 6];
    f.read_exact_at(&mut back, 4096).unwrap();
    assert_eq!(&back, b"engine");
    drop(f);
    let x = e.stop_ok();
    let log = format!("{}{}", x.stderr, x.stdout);
    assert!(
        log.contains(&format!("engine: {engine}")),
        "the daemon should announce engine {engine}: {x}"
    );
    assert!(
        log.contains(&format!("(engine: {engine})")),
        "the exit summary should name engine {engine}: {x}"
    );
    if engine == "async" {
        assert!(
            log.contains("block layer: native async"),
            "a raw image on a file is natively async: {x}"
        );
    }
}

/// Data written through one engine reads back identically through the other, and both
/// engines agree with the image file (flags given explicitly override CORO_FUSE_ENGINE).
#[test]
fn both_engines_agree_on_the_same_image() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("both.img");
    let size = 2 * 1024 * KIB;
    fs::write(&img, random_bytes(2, size)).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let chunks: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| {
            let len = [512, 4 * KIB, 100_000, 300 * KIB][i as usize % 4];
            (
                i * 97_001 % (size as u64 - len as u64),
                random_bytes(10 + i, len),
            )
        })
        .collect();
    let mut e = Export::start(&img, &mnt, &["--engine", "async"]);
    {
        let f = open_rw(e.path());
        for (off, data) in &chunks {
            f.write_all_at(data, *off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let x = e.stop_ok();
    assert!(x.stderr.contains("engine: async"), "{x}");
    let expected = fs::read(&img).unwrap();

    for engine in ["coroutine", "async"] {
        let mut e = Export::start(&img, &mnt, &["--engine", engine]);
        let got = fs::read(e.path()).unwrap();
        assert!(got == expected, "engine {engine} reads different bytes");
        // A short read across EOF and a read past it (semantics shared by both engines).
        let f = fs::File::open(e.path()).unwrap();
        let mut buf = vec![0u8; 8192];
        let n = f.read_at(&mut buf, size as u64 - 100).unwrap();
        assert_eq!(n, 100, "engine {engine}");
        assert_eq!(f.read_at(&mut buf, size as u64 + 10).unwrap(), 0);
        drop(f);
        let x = e.stop_ok();
        assert!(x.stderr.contains(&format!("engine: {engine}")), "{x}");
    }
}

/// A request that panics inside the block layer (the hidden blkdebug `panic` rule) gets EIO
/// and the export keeps serving, in both engines (for async the panic crosses the coroutine
/// bridge and is caught around the handler future).
#[test]
fn a_panicking_request_gets_eio_and_the_export_keeps_serving() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("p.img");
    let data = random_bytes(3, 64 * KIB);
    fs::write(&img, &data).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    for engine in ["coroutine", "async"] {
        let mut e = Export::start(
            &img,
            &mnt,
            &["--engine", engine, "--inject-error", "read:0-512:panic"],
        );
        let f = fs::File::open(e.path()).unwrap();
        let mut buf = vec![0u8; 512];
        let err = f
            .read_exact_at(&mut buf, 0)
            .expect_err("the panicking read fails");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "engine {engine}: {err}"
        );
        f.read_exact_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, data[8192..8192 + 512], "engine {engine} keeps serving");
        drop(f);
        let x = e.stop_ok();
        assert!(
            x.stderr.contains("panicked; replying EIO"),
            "engine {engine}: {x}"
        );
    }
}
