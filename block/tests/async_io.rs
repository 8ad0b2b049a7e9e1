//! The async forms of the BlockBackend: the native route (file, raw windows, null) and the
//! coroutine bridge (growth, truncate, O_DIRECT alignment, blkdebug) give the same results as
//! the coroutine engine.

mod common;

use std::sync::Arc;

use block::{
    open_image, open_image_with, BackendOptions, BlkdebugOp, BlockBackend, BlockError, BlockStatus,
    CacheMode, FileDriver, FileOptions, Format, OpenOptions, Rule,
};
use common::{disk_dir, image, pattern};
use runtime::block_on;

#[test]
fn raw_file_reads_and_writes_natively() {
    let dir = disk_dir();
    let data = pattern(1 << 20, 3);
    let path = image(dir.path(), "a.img", &data);
    let blk = open_image(&path, &OpenOptions::default()).expect("open");
    assert!(blk.is_natively_async());
    block_on(async {
        let mut small = vec![0; 4096];
        blk.pread_async(8192, &mut small).await.expect("read");
        assert_eq!(small, data[8192..8192 + 4096]);
        // Larger than the inline limit: goes to the pool on a memory-backed file, or misses
        // the page cache elsewhere; both paths must agree.
        let mut big = vec![0; 512 << 10];
        blk.pread_async(4096, &mut big).await.expect("read");
        assert_eq!(big, data[4096..4096 + (512 << 10)]);
        let new = pattern(300 << 10, 9);
        blk.pwrite_async(1000, &new).await.expect("write");
        let mut back = vec![0; new.len()];
        blk.pread_async(1000, &mut back).await.expect("read back");
        assert_eq!(back, new);
        blk.flush_async().await.expect("flush");
        blk.pwrite_zeroes_async(0, 4096, true)
            .await
            .expect("zeroes");
        let mut z = vec![1; 4096];
        blk.pread_async(0, &mut z).await.expect("read zeros");
        assert!(z.iter().all(|&b| b == 0));
        let (status, n) = blk.block_status_async(0, 1 << 20).await.expect("status");
        assert!(n >= 1 && matches!(status, BlockStatus::Data | BlockStatus::Zero));
        // Checks are the backend's.
        let err = blk
            .pread_async(1 << 20, &mut small)
            .await
            .expect_err("past EOF");
        assert!(matches!(err, BlockError::OutOfRange { .. }));
    });
    assert_eq!(blk.in_flight(), 0);
    blk.close().expect("close");
}

#[test]
fn growth_and_truncate_go_through_the_bridge() {
    let dir = disk_dir();
    let path = image(dir.path(), "g.img", &[7u8; 4096]);
    let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
    let opts = BackendOptions {
        read_only: false,
        write_beyond_eof: true,
        ..BackendOptions::default()
    };
    let blk = Arc::new(BlockBackend::new(Arc::new(file), opts).expect("backend"));
    block_on(async {
        blk.pwrite_async(8192, b"tail").await.expect("grow");
        assert_eq!(blk.size(), 8196);
        blk.truncate_async(4096).await.expect("shrink");
        assert_eq!(blk.size(), 4096);
    });
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn null_raw_window_and_read_only() {
    let blk = open_image(
        std::path::Path::new("unused"),
        &OpenOptions {
            format: Format::Null,
            size: Some(1 << 20),
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect("null");
    assert!(blk.is_natively_async());
    block_on(async {
        let mut buf = vec![5; 4096];
        blk.pread_async(0, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        let e = blk.pwrite_async(0, &buf).await.expect_err("read-only");
        assert!(matches!(e, BlockError::ReadOnly));
    });

    let dir = disk_dir();
    let data = pattern(64 << 10, 1);
    let path = image(dir.path(), "w.img", &data);
    let windowed = open_image(
        &path,
        &OpenOptions {
            offset: 4096,
            size: Some(8192),
            ..OpenOptions::default()
        },
    )
    .expect("window");
    assert!(windowed.is_natively_async());
    block_on(async {
        let mut buf = vec![0; 8192];
        windowed.pread_async(0, &mut buf).await.expect("read");
        assert_eq!(buf, data[4096..4096 + 8192]);
    });
}

#[test]
fn blkdebug_natively_and_o_direct_through_the_bridge_with_the_same_results() {
    let dir = disk_dir();
    let data = pattern(64 << 10, 2);
    let path = image(dir.path(), "d.img", &data);
    let rule = Rule::new(BlkdebugOp::Read).range(0..512).errno(libc::EIO);
    let blk = open_image_with(&path, &OpenOptions::default(), &[rule]).expect("open");
    assert!(
        blk.is_natively_async(),
        "the filter's rules are awaited natively"
    );
    block_on(async {
        let mut buf = vec![0; 512];
        let e = blk.pread_async(0, &mut buf).await.expect_err("injected");
        assert_eq!(e.errno(), libc::EIO);
        blk.pread_async(4096, &mut buf).await.expect("read");
        assert_eq!(buf, data[4096..4096 + 512]);
    });
    assert_eq!(blk.in_flight(), 0);
    drop(blk);

    let direct = OpenOptions {
        cache: CacheMode::None,
        ..OpenOptions::default()
    };
    let Ok(blk) = open_image(&path, &direct) else {
        common::skip("o_direct bridge", "O_DIRECT not supported here");
        return;
    };
    let blk: Arc<_> = blk;
    block_on(async {
        let mut buf = vec![0; 100];
        blk.pread_async(3, &mut buf).await.expect("unaligned read");
        assert_eq!(buf, data[3..103]);
        blk.pwrite_async(5, b"hello")
            .await
            .expect("unaligned write");
        let mut back = vec![0; 5];
        blk.pread_async(5, &mut back).await.expect("read back");
        assert_eq!(back, b"hello");
    });
}
