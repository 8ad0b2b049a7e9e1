//! `-f null --null-latency NS|yield` (QEMU `null-co` `latency-ns`): every read through the
//! export waits at least the latency, requests wait at the same time rather than one after
//! another (each suspends on its queue thread's timer), `yield` serves as before, and the
//! option is refused without `-f null` or with a value that is neither a number nor `yield`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tests::*;

const LATENCY: Duration = Duration::from_millis(50);

#[test]
fn reads_from_a_null_export_with_latency_take_at_least_the_latency() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("null-co");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let ns = LATENCY.as_nanos().to_string();
    let mut e = Export::start(
        &img,
        &mnt,
        &["-f", "null", "--size", "16M", "--null-latency", &ns],
    );
    let f = open_rw(e.path());
    let mut buf = vec![0xffu8; 4096];
    for i in 0..5u64 {
        let t0 = Instant::now();
        assert_eq!(f.read_at(&mut buf, i * 1_048_576).unwrap(), buf.len());
        let took = t0.elapsed();
        assert!(took >= LATENCY, "read {i} took {took:?} < {LATENCY:?}");
        assert!(buf.iter().all(|&b| b == 0), "null reads zeros");
        buf.fill(0xff);
    }
    let t0 = Instant::now();
    assert_eq!(f.write_at(&buf, 8192).unwrap(), buf.len());
    assert!(t0.elapsed() >= LATENCY, "a write waits too");
    drop(f);
    e.stop_ok();
    assert!(
        !img.exists(),
        "the null driver must not create the image path"
    );
}

/// Six readers at once, each read 500 ms: if the requests waited one after another it would
/// take 3 s; suspended side by side, about 0.5 s (the bound leaves seconds of slack).
#[test]
fn requests_with_latency_wait_side_by_side_on_one_queue_thread() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("null-co");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let latency = Duration::from_millis(500);
    let ns = latency.as_nanos().to_string();
    let args = ["-f", "null", "--threads", "1", "--null-latency", &ns];
    let mut e = Export::start(&img, &mnt, &args);
    let f = Arc::new(open_rw(e.path()));
    let t0 = Instant::now();
    let readers: Vec<_> = (0..6u64)
        .map(|i| {
            let f = f.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                f.read_at(&mut buf, i * 65536).unwrap()
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), 4096);
    }
    let took = t0.elapsed();
    assert!(took >= latency, "{took:?}");
    assert!(
        took < latency * 5,
        "six reads of {latency:?} took {took:?}: they waited one after another"
    );
    drop(f);
    e.stop_ok();
}

#[test]
fn yield_once_serves_reads_and_writes() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("null-co");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let args = ["-f", "null", "--size", "4M", "--null-latency", "yield"];
    let mut e = Export::start(&img, &mnt, &args);
    let f = open_rw(e.path());
    let mut buf = vec![0xffu8; 65536];
    assert_eq!(f.write_at(&buf, 4096).unwrap(), buf.len());
    f.sync_all().unwrap();
    assert_eq!(f.read_at(&mut buf, 4096).unwrap(), buf.len());
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    e.stop_ok();
}

#[test]
fn null_latency_needs_the_null_driver_and_a_valid_value() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("disk.img");
    fs::write(&img, vec![0u8; 65536]).unwrap();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let (img, mnt) = (img.to_str().unwrap(), mnt.to_str().unwrap());
    for args in [
        vec!["--null-latency", "1000", img, mnt],
        vec!["-f", "raw", "--null-latency", "yield", img, mnt],
        vec!["-f", "null", "--null-latency", "1ms", img, mnt],
        vec!["-f", "null", "--null-latency=-5", img, mnt],
    ] {
        let out = coro_fuse_expect_exit(&args, Some(std::path::Path::new(mnt)));
        assert_eq!(out.code(), Some(2), "{args:?} must exit 2: {out}");
        assert!(out.stderr.contains("null-latency"), "{args:?}: {out}");
    }
}
