//! The blkdebug gate of the hidden `--inject-error read:hold=FILE`: every matching request
//! waits, suspended, until FILE appears; then all of them complete with the right data. The
//! memory measurements (`scripts/memory-at-scale.py`) hold tens of thousands of requests with
//! it; here 200, with each engine.
//!
//! (What happens when coroutine stacks hit `vm.max_map_count` is measured by the script, not
//! tested here: lowering that machine-wide sysctl would fail other processes' mappings while
//! the suite runs. `bounded.rs` tests the same ENOMEM path with `--inject-enomem`.)

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tests::*;

const HELD: usize = 200;
const BLOCK: usize = 4096;

/// The gate's latest `N request(s) held` count in the daemon's log.
fn held(e: &Export) -> usize {
    e.stderr()
        .lines()
        .rev()
        .filter(|l| l.contains("request(s) held"))
        .find_map(|l| l.rsplit(": ").next()?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn hold_and_release(engine: &str) {
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, HELD * BLOCK, 16);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let gate = dir.path().join("gate");
    let rule = format!("read:hold={}", gate.display());
    let mut e = Export::start(
        &img,
        &mnt,
        &[
            "--engine",
            engine,
            "--max-in-flight",
            "1024",
            // Over io_uring, requests in flight are bounded by the ring's entries (32 here).
            "--transport",
            "dev",
            "--inject-error",
            &rule,
        ],
    );
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..HELD)
        .map(|i| {
            let (path, done) = (e.path().to_owned(), done.clone());
            thread::spawn(move || {
                let f = fs::File::open(&path).unwrap();
                let mut buf = vec![0u8; BLOCK];
                f.read_exact_at(&mut buf, (i * BLOCK) as u64).unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                buf
            })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || held(&e) == HELD),
        "{engine}: the gate never held {HELD} reads (last count {}):\n{}",
        held(&e),
        e.logs()
    );
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "{engine}: a held read completed"
    );
    fs::write(&gate, b"").unwrap();
    for (i, c) in clients.into_iter().enumerate() {
        let got = c.join().expect("client thread");
        assert_same_bytes(&got, &data[i * BLOCK..(i + 1) * BLOCK], "a released read");
    }
    assert!(
        e.stderr().contains(&format!("released {HELD} request(s)")),
        "{}",
        e.logs()
    );
    // Later reads pass the open gate at once.
    let mut buf = vec![0u8; BLOCK];
    fs::File::open(e.path())
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_same_bytes(&buf, &data[..BLOCK], "a read after the release");
    e.stop_ok();
}

#[test]
fn the_gate_holds_reads_until_released_coroutine() {
    require!(fuse_available());
    hold_and_release("coroutine");
}

#[test]
fn the_gate_holds_reads_until_released_async() {
    require!(fuse_available());
    hold_and_release("async");
}
