//! `AioMode::IoUring` on a thread whose event loop has no io_uring: every request that must
//! wait goes to the thread pool instead, in both engines, and gives the same results.
//!
//! The loop's choice ([`runtime::set_fd_monitor`]) is process-global, so this is one test in a
//! binary of its own: no other test can create its context while epoll is forced.

mod common;

use std::sync::{mpsc, Arc};

use block::{
    AioMode, BackendOptions, BlockBackend, BlockStatus, CacheMode, FileDriver, FileOptions,
};
use common::{co, disk_dir, image, pattern};
use runtime::{block_on, AioContext, FdMonitor};

#[test]
fn io_uring_mode_without_a_ring_uses_the_pool() {
    let dir = disk_dir();
    let mut model = pattern(256 * 1024, 5);
    let path = image(dir.path(), "fallback.img", &model);
    image(dir.path(), "wb.img", &[0; 65_536]);

    runtime::set_fd_monitor(FdMonitor::Epoll);
    let (created, wait_created) = mpsc::channel();
    let (go, wait_go) = mpsc::channel::<()>();
    let p = path.clone();
    let worker = std::thread::spawn(move || {
        // This thread's context is created now, while epoll is forced.
        let ring = AioContext::with_current(|c| c.has_io_uring());
        created.send(ring).expect("report the context");
        wait_go.recv().expect("wait for the main thread");
        let opts = FileOptions {
            aio: AioMode::IoUring,
            cache: CacheMode::None,
            ..FileOptions::default()
        };
        let file = Arc::new(FileDriver::open(&p, &opts).expect("open"));
        let blk = Arc::new(BlockBackend::new(file.clone(), BackendOptions::default()).expect("bb"));

        // Coroutine engine.
        let b = blk.clone();
        let read = co(move || {
            b.co_pwrite(4096, &pattern(8192, 6)).expect("write");
            b.co_pwrite(10_001, &pattern(333, 7))
                .expect("unaligned write");
            b.co_pwrite_zeroes(64 * 1024, 64 * 1024, true)
                .expect("zeroes");
            b.co_flush().expect("flush");
            let mut buf = vec![0; 256 * 1024];
            b.co_pread(0, &mut buf).expect("read");
            let status = b.co_block_status(64 * 1024, 64 * 1024).expect("status");
            (buf, status)
        });
        let after_co = file.stats();

        // Async engine (O_DIRECT: through the bridge), and the async file path itself.
        let read_async = block_on(async {
            blk.pwrite_async(131_072, &pattern(4096, 8))
                .await
                .expect("write");
            blk.flush_async().await.expect("flush");
            let mut buf = vec![0; 256 * 1024];
            blk.pread_async(0, &mut buf).await.expect("read");
            buf
        });
        let wb = FileDriver::open(
            &dir_of(&p).join("wb.img"),
            &FileOptions {
                aio: AioMode::IoUring,
                ..FileOptions::default()
            },
        )
        .expect("open writeback");
        block_on(async {
            let path = block::AsyncPath::of(&wb).expect("async path");
            path.pwritev(0, &pattern(65_536, 9)).await.expect("write");
            path.flush().await.expect("flush");
        });
        blk.close().expect("close");
        (read, after_co, read_async, file.stats(), wb.stats())
    });
    let worker_ring = wait_created.recv().expect("the worker's context");
    runtime::set_fd_monitor(FdMonitor::IoUring);
    // A thread created after the restore gets a ring again (if the kernel has io_uring).
    let later = std::thread::spawn(|| AioContext::with_current(|c| c.has_io_uring()))
        .join()
        .expect("join");
    go.send(()).expect("start the worker");
    let ((read, status), after_co, read_async, stats, wb_stats) =
        worker.join().expect("the worker panicked");

    assert!(
        !worker_ring,
        "FdMonitor::Epoll: the context must have no ring"
    );
    if runtime::io_uring_supported().is_ok() {
        assert!(
            later,
            "FdMonitor::IoUring restored: a new context has a ring"
        );
    }

    model[4096..4096 + 8192].copy_from_slice(&pattern(8192, 6));
    model[10_001..10_001 + 333].copy_from_slice(&pattern(333, 7));
    model[64 * 1024..128 * 1024].fill(0);
    assert!(read == model, "coroutine reads differ from the model");
    assert_eq!(status, (BlockStatus::Zero, 64 * 1024));
    model[131_072..131_072 + 4096].copy_from_slice(&pattern(4096, 8));
    assert!(read_async == model, "async reads differ from the model");
    let on_disk = std::fs::read(&path).expect("read the image");
    assert!(on_disk == model, "the file differs from the model");

    assert_eq!(after_co.ring_requests, 0, "{after_co:?}");
    assert!(after_co.pool_requests >= 5, "{after_co:?}");
    assert_eq!(stats.ring_requests, 0, "{stats:?}");
    assert!(stats.pool_requests > after_co.pool_requests, "{stats:?}");
    assert_eq!(wb_stats.ring_requests, 0, "{wb_stats:?}");
    assert!(wb_stats.pool_requests >= 1, "{wb_stats:?}");
    let wb = std::fs::read(dir.path().join("wb.img")).expect("read wb.img");
    assert_eq!(wb, pattern(65_536, 9));
}

fn dir_of(p: &std::path::Path) -> &std::path::Path {
    p.parent().expect("the image is in a directory")
}
