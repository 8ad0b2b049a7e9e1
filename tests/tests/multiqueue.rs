//! Multi-queue (`--threads N`): every queue thread serves requests, and verified I/O from 8
//! client threads survives a resize and a SIGTERM in the middle.

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tests::*;

const MIB: u64 = 1024 * 1024;

/// The per-queue counters the daemon logs at exit: `requests served per queue: [a, b, …]`.
fn served_per_queue(stderr: &str) -> Vec<u64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("requests served per queue"))
        .unwrap_or_else(|| panic!("no per-queue statistics in the log:\n{stderr}"));
    let list = line.rsplit('[').next().unwrap_or("").trim_end_matches(']');
    list.split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[test]
fn every_queue_thread_serves_requests() {
    require!(fuse_available());
    for threads in [2usize, 4] {
        let dir = workdir();
        let img = dir.path().join("t.img");
        random_image(&img, 8 * MIB as usize, 3);
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let n = threads.to_string();
        let mut e = Export::start(&img, &mnt, &["--threads", n.as_str()]);
        // Parallel clients keep several requests in flight, so every clone gets woken.
        let clients: Vec<_> = (0..8u64)
            .map(|t| {
                let p = e.path().to_path_buf();
                thread::spawn(move || {
                    let f = open_rw(&p);
                    let mut buf = vec![0u8; 4096];
                    let mut rng = Prng::new(t + 1);
                    for _ in 0..2000 {
                        let off = rng.below(2048) * 4096;
                        f.read_exact_at(&mut buf, off).expect("read");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("client");
        }
        let x = e.stop_ok();
        let served = served_per_queue(&x.stderr);
        assert_eq!(served.len(), threads, "one counter per queue: {served:?}");
        // Over io_uring, a queue thread serves the kernel queues (one per CPU) given to it:
        // threads beyond the CPUs have none, and only see FORGET and INTERRUPT.
        let serving = match x.stderr.split(" entries on each of ").nth(1) {
            Some(rest) => rest
                .split(' ')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .expect("the number of kernel queues")
                .min(threads),
            None => threads,
        };
        assert!(
            served[..serving].iter().all(|&n| n > 0),
            "with --threads {threads} every queue ({serving} with kernel queues) must serve \
             requests: {served:?}"
        );
        assert!(
            served.iter().sum::<u64>() >= 16_000,
            "all reads counted: {served:?}"
        );
    }
}

/// 8 client threads write verified, numbered blocks with fsync while the export is grown and
/// shrunk (within a region nobody writes) and finally stopped with SIGTERM: every write whose
/// fsync returned before the stop is in the image afterwards, and the daemon exits 0.
#[test]
fn stress_resize_and_sigterm_keep_every_acknowledged_write() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data_size = 8 * MIB as usize;
    random_image(&img, data_size, 5);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--threads", "4"]);
    let stop = Arc::new(AtomicBool::new(false));
    // (offset, pattern seed) of writes acknowledged by fsync, and of every write attempted (a
    // write cut off by the stop may still have landed, after the last acknowledged one).
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let attempted: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let block = 4096u64;
    let per_client = data_size as u64 / 8;
    let clients: Vec<_> = (0..8u64)
        .map(|t| {
            let (p, stop, acked, attempted) = (
                e.path().to_path_buf(),
                stop.clone(),
                acked.clone(),
                attempted.clone(),
            );
            thread::spawn(move || {
                let Ok(f) = fs::OpenOptions::new().read(true).write(true).open(&p) else {
                    return;
                };
                let mut rng = Prng::new(100 + t);
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let off = t * per_client + rng.below(per_client / block) * block;
                    let seed = (t << 32) | seq;
                    seq += 1;
                    let buf = pattern(seed, block as usize);
                    attempted.lock().unwrap().push((off, seed));
                    if f.write_all_at(&buf, off).is_err() || f.sync_data().is_err() {
                        return; // the export went away: later writes were never acknowledged
                    }
                    // Read back through the export: it must be what we wrote.
                    let mut back = vec![0u8; block as usize];
                    if f.read_exact_at(&mut back, off).is_ok() {
                        assert_eq!(back, buf, "client {t}: read-back mismatch at {off}");
                    }
                    acked.lock().unwrap().push((off, seed));
                }
            })
        })
        .collect();
    // Resize beyond the clients' region while they run: grow, then shrink back.
    let p = e.path().to_path_buf();
    for round in 0..10u64 {
        thread::sleep(Duration::from_millis(30));
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open for resize");
        let grow = data_size as u64 + (round + 1) * MIB;
        f.set_len(grow).expect("grow");
        assert_eq!(file_size(&p), grow, "every queue sees the new size");
        f.set_len(data_size as u64).expect("shrink back");
    }
    thread::sleep(Duration::from_millis(100));
    let x = e.stop(); // SIGTERM while the clients are still writing
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.join(); // a client may see ENOTCONN at the stop; that is not a failure
    }
    assert_eq!(x.code(), Some(0), "SIGTERM under load exits 0: {x}");
    let image = fs::read(&img).unwrap();
    assert_eq!(image.len(), data_size, "size after the resizes");
    // Each block holds its last acknowledged write, or a write attempted after it (cut off by
    // the stop before its fsync returned) — never older data.
    let acked = acked.lock().unwrap();
    let attempted = attempted.lock().unwrap();
    assert!(
        acked.len() > 100,
        "the clients made progress: {} writes",
        acked.len()
    );
    let mut last = std::collections::HashMap::new();
    for &(off, seed) in acked.iter() {
        last.insert(off, seed);
    }
    for (off, seed) in last {
        let got = &image[off as usize..(off + block) as usize];
        let ok = attempted
            .iter()
            .filter(|&&(o, s)| o == off && s >= seed) // seeds grow per client and offset
            .any(|&(_, s)| got == pattern(s, block as usize).as_slice());
        assert!(ok, "acknowledged write at {off} (seed {seed:#x}) was lost");
    }
}

/// Deterministic block contents for a seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Prng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}
