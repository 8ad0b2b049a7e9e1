//! The null driver's latency (`OpenOptions::null_latency`, QEMU `null-co` `latency-ns`): a
//! request with a latency truly suspends — another coroutine or task of the same thread runs
//! while it waits — and completes no earlier than the latency, in both engines; `YieldOnce`
//! suspends exactly through the loop; the default never suspends. The order of events is the
//! oracle: `A start`, then `B` (which can only run while A is suspended), then `A end`.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockBackend, BlockError, Format, NullLatency, OpenOptions};
use runtime::{block_on, spawn_local};

const LATENCY: Duration = Duration::from_millis(20);

fn null(latency: NullLatency) -> Arc<BlockBackend> {
    let opts = OpenOptions {
        format: Format::Null,
        size: Some(1 << 20),
        null_latency: latency,
        ..OpenOptions::default()
    };
    block::open_image(Path::new("null-co://"), &opts).expect("open a null device")
}

type Log = Rc<RefCell<Vec<&'static str>>>;

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Flush,
}

/// Coroutine A does one `op` on `blk`; coroutine B is started right after A's `spawn`
/// returned. Returns the order of events and how long A's request took.
fn coroutine_pair(blk: &Arc<BlockBackend>, op: Op) -> (Vec<&'static str>, Duration) {
    let log: Log = Rc::default();
    let (a_log, a_blk) = (log.clone(), blk.clone());
    let a = runtime::spawn(move || {
        a_log.borrow_mut().push("A start");
        let t0 = Instant::now();
        let mut buf = vec![0xffu8; 4096];
        let r = match op {
            Op::Read => a_blk.co_pread(4096, &mut buf),
            Op::Write => a_blk.co_pwrite(4096, &buf),
            Op::Flush => a_blk.co_flush(),
        };
        let took = t0.elapsed();
        r.expect("the request succeeds");
        if let Op::Read = op {
            assert!(buf.iter().all(|&b| b == 0), "a null device reads zeros");
        }
        a_log.borrow_mut().push("A end");
        took
    });
    let b_log = log.clone();
    let b = runtime::spawn(move || b_log.borrow_mut().push("B"));
    b.join().expect("B finishes");
    let took = a.join().expect("A finishes");
    let order = log.borrow().clone();
    (order, took)
}

/// The same with two tasks of the async engine.
fn task_pair(blk: &Arc<BlockBackend>, op: Op) -> (Vec<&'static str>, Duration) {
    let log: Log = Rc::default();
    let (a_log, a_blk) = (log.clone(), blk.clone());
    let a = spawn_local(async move {
        a_log.borrow_mut().push("A start");
        let t0 = Instant::now();
        let mut buf = vec![0xffu8; 4096];
        let r = match op {
            Op::Read => a_blk.pread_async(4096, &mut buf).await,
            Op::Write => a_blk.pwrite_async(4096, &buf).await,
            Op::Flush => a_blk.flush_async().await,
        };
        let took = t0.elapsed();
        r.expect("the request succeeds");
        if let Op::Read = op {
            assert!(buf.iter().all(|&b| b == 0), "a null device reads zeros");
        }
        a_log.borrow_mut().push("A end");
        took
    });
    let b_log = log.clone();
    let b = spawn_local(async move { b_log.borrow_mut().push("B") });
    block_on(b).expect("B finishes");
    let took = block_on(a).expect("A finishes");
    let order = log.borrow().clone();
    (order, took)
}

const SUSPENDED: [&str; 3] = ["A start", "B", "A end"];
const INLINE: [&str; 3] = ["A start", "A end", "B"];

#[test]
fn a_coroutine_request_with_latency_suspends_for_at_least_the_latency() {
    let blk = null(NullLatency::Sleep(LATENCY));
    for op in [Op::Read, Op::Write, Op::Flush] {
        let (order, took) = coroutine_pair(&blk, op);
        assert_eq!(order, SUSPENDED, "{op:?}: B ran while A waited");
        assert!(took >= LATENCY, "{op:?} took {took:?} < {LATENCY:?}");
    }
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn a_task_request_with_latency_suspends_for_at_least_the_latency() {
    let blk = null(NullLatency::Sleep(LATENCY));
    for op in [Op::Read, Op::Write, Op::Flush] {
        let (order, took) = task_pair(&blk, op);
        assert_eq!(order, SUSPENDED, "{op:?}: B ran while A waited");
        assert!(took >= LATENCY, "{op:?} took {took:?} < {LATENCY:?}");
    }
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn yield_once_suspends_through_the_loop_in_both_engines() {
    let blk = null(NullLatency::YieldOnce);
    for op in [Op::Read, Op::Write, Op::Flush] {
        assert_eq!(coroutine_pair(&blk, op).0, SUSPENDED, "coroutine {op:?}");
        assert_eq!(task_pair(&blk, op).0, SUSPENDED, "task {op:?}");
    }
}

#[test]
fn without_latency_a_request_completes_inline_in_both_engines() {
    for latency in [NullLatency::Inline, NullLatency::Sleep(Duration::ZERO)] {
        let blk = null(latency);
        for op in [Op::Read, Op::Write, Op::Flush] {
            assert_eq!(coroutine_pair(&blk, op).0, INLINE, "coroutine {op:?}");
            assert_eq!(task_pair(&blk, op).0, INLINE, "task {op:?}");
        }
    }
}

#[test]
fn many_requests_with_latency_wait_at_the_same_time() {
    // 32 coroutines are all suspended in their read at once (none has finished when the last
    // one started): their waits overlap instead of queueing behind each other.
    let blk = null(NullLatency::Sleep(LATENCY));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..32u64)
        .map(|i| {
            let b = blk.clone();
            runtime::spawn(move || b.co_pread(i * 4096, &mut [0u8; 512]))
        })
        .collect();
    assert!(handles.iter().all(|h| !h.is_finished()));
    assert_eq!(blk.in_flight(), 32);
    for h in handles {
        h.join().expect("no panic").expect("read");
    }
    assert!(t0.elapsed() >= LATENCY);
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn a_latency_is_refused_for_other_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 4096]).expect("write image");
    let opts = OpenOptions {
        format: Format::Raw,
        null_latency: NullLatency::YieldOnce,
        ..OpenOptions::default()
    };
    match block::open_image(&path, &opts) {
        Err(BlockError::Invalid(why)) => assert!(why.contains("null"), "{why}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a raw image with a null latency was opened"),
    }
}
