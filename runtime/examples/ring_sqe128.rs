//! What 128-byte SQEs (`IORING_SETUP_SQE128`) cost the ordinary ring traffic: the same loops on
//! a ring of 64-byte SQEs and on one of 128-byte SQEs, alternated, several rounds.
//!
//! ```text
//! cargo run --release -p runtime --example ring_sqe128 [ROUNDS]
//! ```
//!
//! Loops, each timed per operation (median of the rounds is printed):
//! - `co_read_4k`: a coroutine reads 4 KiB of a page-cached file through the ring (one SQE,
//!   one `io_uring_enter`, one CQE per read);
//! - `co_read_batch16`: sixteen coroutines each read 4 KiB, all SQEs of a round in one enter;
//! - `poll_idle`: `AioContext::poll(false)` with nothing to do (no syscall);
//! - `bh_round`: schedule a bottom half and `poll(true)` until it ran (the notifier's
//!   `POLL_ADD` re-armed through the ring each time).
//!
//! The numbers for this machine are in `docs/fuse-uring.md`.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::Instant;

use runtime::ring::set_ring_sqe128;
use runtime::{spawn, uring, AioContext};

const N: u32 = 100_000;

fn measure(big: bool) -> [f64; 4] {
    set_ring_sqe128(big);
    std::thread::spawn(move || {
        let ctx = AioContext::current();
        assert_eq!(uring::sqe128_available(), big);
        let f = Rc::new(tempfile::tempfile().expect("tempfile"));
        std::fs::write(
            format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                f.as_raw_fd()
            }),
            vec![1u8; 1 << 20],
        )
        .expect("fill");

        let f1 = f.clone();
        let t = Instant::now();
        spawn(move || {
            let mut buf = vec![0u8; 4096];
            for i in 0..N {
                let off = u64::from(i % 256) * 4096;
                let n = uring::co_read(f1.as_fd(), &mut buf, off)
                    .expect("ring")
                    .expect("read");
                assert_eq!(n, 4096);
            }
        })
        .join()
        .expect("reader");
        let read = t.elapsed().as_nanos() as f64 / f64::from(N);

        let t = Instant::now();
        let rounds = N / 16;
        for r in 0..rounds {
            let hs: Vec<_> = (0..16u64)
                .map(|i| {
                    let f = f.clone();
                    spawn(move || {
                        let mut buf = [0u8; 4096];
                        let off = (u64::from(r) * 16 + i) % 256 * 4096;
                        uring::co_read(f.as_fd(), &mut buf, off)
                            .expect("ring")
                            .expect("read")
                    })
                })
                .collect();
            for h in hs {
                assert_eq!(h.join().expect("reader"), 4096);
            }
        }
        let batch = t.elapsed().as_nanos() as f64 / f64::from(rounds * 16);

        let t = Instant::now();
        for _ in 0..N {
            ctx.poll(false);
        }
        let idle = t.elapsed().as_nanos() as f64 / f64::from(N);

        let ran = Rc::new(Cell::new(false));
        let r2 = ran.clone();
        let bh = ctx.bh_new(move || r2.set(true));
        let t = Instant::now();
        for _ in 0..N {
            ran.set(false);
            bh.schedule();
            while !ran.get() {
                ctx.poll(true);
            }
        }
        let bh_round = t.elapsed().as_nanos() as f64 / f64::from(N);
        [read, batch, idle, bh_round]
    })
    .join()
    .expect("measuring thread")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let mut small = vec![Vec::new(); 4];
    let mut big = vec![Vec::new(); 4];
    for _ in 0..rounds {
        for (on, out) in [(false, &mut small), (true, &mut big)] {
            for (i, x) in measure(on).into_iter().enumerate() {
                out[i].push(x);
            }
        }
    }
    println!("| loop | SQE64 ns/op | SQE128 ns/op | ratio |");
    println!("|---|---|---|---|");
    for (i, name) in ["co_read_4k", "co_read_batch16", "poll_idle", "bh_round"]
        .iter()
        .enumerate()
    {
        let (a, b) = (median(&mut small[i]), median(&mut big[i]));
        println!("| {name} | {a:.0} | {b:.0} | {:.3} |", b / a);
    }
}
