//! One backend shared by coroutines on several threads; in-flight counting and drain.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use block::{
    open_image, BackendOptions, BlkdebugDriver, BlkdebugOp, BlockBackend, BlockDriver, BlockError,
    BlockStatus, Format, NullDriver, OpenOptions, Rule,
};
use common::{co, disk_dir, image, pattern};
use runtime::{AioContext, IoThread};

#[test]
fn two_iothreads_write_disjoint_ranges() {
    let dir = disk_dir();
    let half = 1 << 20;
    let path = image(dir.path(), "two.img", &vec![0u8; 2 * half]);
    let blk = open_image(
        &path,
        &OpenOptions {
            format: Format::Raw,
            ..OpenOptions::default()
        },
    )
    .expect("open");
    let threads: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("io{i}")).expect("iothread"))
        .collect();
    let (tx, rx) = mpsc::channel();
    for (t, thread) in threads.iter().enumerate() {
        // Several coroutines per thread, so requests also overlap within one thread.
        for c in 0..4 {
            let (b, tx) = (blk.clone(), tx.clone());
            thread.spawn_co(move || {
                let base = (t * half + c * half / 4) as u64;
                let mut res = Ok(());
                for i in 0..32u64 {
                    let data = pattern(8192, (t * 4 + c) as u8);
                    res = res.and_then(|()| b.co_pwrite(base + i * 8192, &data));
                }
                let _ = tx.send(res.map_err(|e| e.to_string()));
            });
        }
    }
    drop(tx);
    for r in rx.iter() {
        r.expect("a write failed");
    }
    for t in threads {
        t.stop();
    }
    assert_eq!(blk.in_flight(), 0);
    let data = std::fs::read(&path).expect("read");
    for t in 0..2 {
        for c in 0..4 {
            let base = t * half + c * half / 4;
            for i in 0..32 {
                let chunk = &data[base + i * 8192..][..8192];
                assert!(
                    chunk == &pattern(8192, (t * 4 + c) as u8)[..],
                    "thread {t} co {c} #{i}"
                );
            }
        }
    }
}

/// A driver whose reads take a while and count themselves finished just before returning, so
/// the test can tell "drain returned" from "the requests really ended".
struct SlowDriver {
    finished: AtomicUsize,
}

impl BlockDriver for SlowDriver {
    fn format_name(&self) -> &'static str {
        "slow"
    }
    fn getlength(&self) -> u64 {
        1 << 20
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn co_preadv(&self, _offset: u64, buf: &mut [u8]) -> block::Result<()> {
        runtime::co_sleep(Duration::from_millis(100));
        buf.fill(0);
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn co_pwritev(&self, _: u64, _: &[u8]) -> block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn co_flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn co_pwrite_zeroes(&self, _: u64, _: u64, _: bool) -> block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn co_pdiscard(&self, _: u64, _: u64) -> block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn co_block_status(&self, _: u64, len: u64) -> block::Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Zero, len))
    }
    fn co_truncate(&self, _: u64) -> block::Result<()> {
        Err(BlockError::ReadOnly)
    }
}

#[test]
fn drain_waits_for_requests_in_flight_on_another_thread() {
    let slow = Arc::new(SlowDriver {
        finished: AtomicUsize::new(0),
    });
    let opts = BackendOptions {
        read_only: true,
        write_beyond_eof: false,
        ..BackendOptions::default()
    };
    let blk = Arc::new(BlockBackend::new(slow.clone(), opts).expect("backend"));
    let io = IoThread::spawn("drain-io").expect("iothread");
    let n = 8;
    for i in 0..n {
        let b = blk.clone();
        io.spawn_co(move || {
            let mut buf = vec![0xffu8; 4096];
            b.co_pread(i * 4096, &mut buf).expect("read");
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while blk.in_flight() < n as usize {
        assert!(Instant::now() < deadline, "the requests never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The main loop waits; the iothread's last request kicks it.
    blk.drain(&AioContext::current());
    assert_eq!(blk.in_flight(), 0);
    assert_eq!(
        slow.finished.load(Ordering::SeqCst),
        n as usize,
        "drain returned early"
    );
    blk.drain(&AioContext::current()); // nothing in flight: returns at once
    io.stop();
}

#[test]
fn blkdebug_delay_keeps_requests_in_flight() {
    let dbg = Arc::new(BlkdebugDriver::new(Arc::new(NullDriver::new(
        1 << 20,
        false,
    ))));
    // errno 0: no failure, only a delay.
    dbg.add_rule(
        Rule::new(BlkdebugOp::Read)
            .errno(0)
            .delay(Duration::from_millis(50)),
    );
    let blk = Arc::new(BlockBackend::new(dbg, BackendOptions::default()).expect("backend"));
    let io = IoThread::spawn("delay-io").expect("iothread");
    let b = blk.clone();
    io.spawn_co(move || {
        let mut buf = [0u8; 512];
        b.co_pread(0, &mut buf).expect("read");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while blk.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    blk.drain(&AioContext::current());
    assert_eq!(blk.in_flight(), 0);
    io.stop();
}

#[test]
fn in_flight_returns_to_zero_after_errors() {
    let dbg = Arc::new(BlkdebugDriver::new(Arc::new(NullDriver::new(4096, false))));
    dbg.add_rule(Rule::new(BlkdebugOp::Any).range(0..512).errno(libc::EIO));
    let blk = Arc::new(BlockBackend::new(dbg, BackendOptions::default()).expect("backend"));
    let b = blk.clone();
    co(move || {
        let mut buf = [0u8; 512];
        assert!(b.co_pread(0, &mut buf).is_err()); // injected
        assert!(b.co_pread(4000, &mut buf).is_err()); // out of range
        assert!(b.co_pwrite(0, &buf).is_err());
        assert!(b.co_block_status(0, 512).is_err());
        assert!(b.co_pread(512, &mut buf).is_ok());
        assert_eq!(b.in_flight(), 0);
    });
    let ro = BlockBackend::new(
        Arc::new(NullDriver::new(4096, false)),
        BackendOptions {
            read_only: true,
            write_beyond_eof: false,
            ..BackendOptions::default()
        },
    )
    .expect("backend");
    assert!(matches!(
        co(move || ro.co_pwrite(0, &[1]).map(|_| ro.in_flight())),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn many_coroutines_on_one_thread_share_the_pool() {
    let dir = disk_dir();
    let path = image(dir.path(), "many.img", &pattern(1 << 20, 9));
    let blk = open_image(
        &path,
        &OpenOptions {
            format: Format::Raw,
            ..OpenOptions::default()
        },
    )
    .expect("open");
    let handles: Vec<_> = (0..128u64)
        .map(|i| {
            let b = blk.clone();
            runtime::spawn(move || {
                let mut buf = vec![0u8; 8192];
                b.co_pread(i * 8192, &mut buf).map(|()| buf)
            })
        })
        .collect();
    let expected = pattern(1 << 20, 9);
    for (i, h) in handles.into_iter().enumerate() {
        let buf = match h.join() {
            Ok(r) => r.expect("read"),
            Err(p) => panic!("{p}"),
        };
        assert!(buf == expected[i * 8192..(i + 1) * 8192], "read {i}");
    }
    assert_eq!(blk.in_flight(), 0);
}
