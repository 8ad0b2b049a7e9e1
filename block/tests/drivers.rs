//! The raw window, the null driver and blkdebug, through a `BlockBackend`.

mod common;

use std::sync::Arc;

use block::{
    open_image, BackendOptions, BlkdebugDriver, BlkdebugOp, BlockBackend, BlockDriver, BlockError,
    BlockStatus, FileDriver, FileOptions, Format, OpenOptions, RawDriver, RawOptions, Rule,
};
use common::{co, disk_dir, image, pattern};

#[test]
fn raw_window_maps_offsets_and_stays_inside() {
    let dir = disk_dir();
    let original = pattern(1 << 20, 21);
    let path = image(dir.path(), "window.img", &original);
    let opts = OpenOptions {
        format: Format::Raw,
        offset: 64 * 1024,
        size: Some(128 * 1024),
        ..OpenOptions::default()
    };
    let blk = open_image(&path, &opts).expect("open with a window");
    assert_eq!(blk.size(), 128 * 1024);
    let b = blk.clone();
    let first = co(move || {
        let mut buf = vec![0u8; 4096];
        b.co_pread(0, &mut buf).expect("read");
        b.co_pwrite(0, b"WINDOW")
            .expect("write at the window start");
        b.co_pwrite(128 * 1024 - 3, b"END")
            .expect("write at the window end");
        assert!(matches!(
            b.co_pread(128 * 1024, &mut [0; 1]),
            Err(BlockError::OutOfRange { .. })
        ));
        let e = b
            .co_truncate(256 * 1024)
            .expect_err("resizing a fixed window");
        assert!(matches!(e, BlockError::NotSupported(_)), "{e}");
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        buf
    });
    assert_eq!(first, &original[64 * 1024..68 * 1024]);
    let mut expected = original.clone();
    expected[64 * 1024..64 * 1024 + 6].copy_from_slice(b"WINDOW");
    expected[192 * 1024 - 3..192 * 1024].copy_from_slice(b"END");
    assert!(
        std::fs::read(&path).expect("read") == expected,
        "bytes outside the window changed"
    );

    drop(blk); // release the image lock
    let e = open_image(
        &path,
        &OpenOptions {
            size: Some(2 << 20),
            ..opts
        },
    )
    .expect_err("too big");
    assert!(
        e.to_string().contains(&path.display().to_string()),
        "names the file: {e}"
    );
    assert!(
        e.to_string()
            .contains("must not exceed the size of the file"),
        "{e}"
    );
    assert!(open_image(
        &path,
        &OpenOptions {
            offset: 2 << 20,
            size: None,
            ..opts
        }
    )
    .is_err());
}

#[test]
fn raw_window_block_status_is_shifted() {
    let dir = disk_dir();
    let path = dir.path().join("sparse-window.img");
    std::fs::File::create(&path)
        .expect("create")
        .set_len(1 << 20)
        .expect("set_len");
    let file: Arc<dyn BlockDriver> =
        Arc::new(FileDriver::open(&path, &FileOptions::default()).expect("open"));
    let raw = RawDriver::new(
        file,
        RawOptions {
            offset: 512 * 1024,
            size: None,
        },
    )
    .expect("raw");
    let blk = Arc::new(BlockBackend::new(Arc::new(raw), BackendOptions::default()).expect("blk"));
    let b = blk.clone();
    let (before, after) = co(move || {
        let before = b.co_block_status(0, 1 << 20).expect("status");
        b.co_pwrite(64 * 1024, &[1; 4096]).expect("write");
        (before, b.co_block_status(64 * 1024, 4096).expect("status"))
    });
    if before.0 == BlockStatus::Zero {
        assert_eq!(
            before,
            (BlockStatus::Zero, 512 * 1024),
            "clamped to the window"
        );
        assert_eq!(after, (BlockStatus::Data, 4096));
    }
    let data = std::fs::read(&path).expect("read");
    assert_eq!(data[576 * 1024], 1, "written at offset + 64 KiB");
}

#[test]
fn null_driver_reads_zeros_and_forgets_writes() {
    let opts = OpenOptions {
        format: Format::Null,
        size: Some(1 << 20),
        ..OpenOptions::default()
    };
    let blk = open_image(std::path::Path::new("ignored"), &opts).expect("null");
    assert_eq!(blk.size(), 1 << 20);
    assert_eq!(blk.format_name(), "null-co");
    let b = blk.clone();
    co(move || {
        b.co_pwrite(0, &[0xaa; 4096]).expect("write");
        let mut buf = vec![0xffu8; 4096];
        b.co_pread(0, &mut buf).expect("read");
        assert!(
            buf.iter().all(|&x| x == 0),
            "reads fill the buffer with zeros"
        );
        assert_eq!(
            b.co_block_status(100, 1000).expect("status"),
            (BlockStatus::Zero, 1000)
        );
        b.co_flush().expect("flush");
        b.co_pwrite_zeroes(0, 4096, true).expect("zeroes");
        b.co_pdiscard(0, 4096).expect("discard");
        b.co_truncate(2 << 20).expect("truncate");
        assert_eq!(b.size(), 2 << 20);
    });
    let ro = open_image(
        std::path::Path::new("ignored"),
        &OpenOptions {
            read_only: true,
            ..opts
        },
    )
    .expect("read-only null");
    assert!(matches!(
        co(move || ro.co_pwrite(0, &[1])),
        Err(BlockError::ReadOnly)
    ));
    let default = open_image(
        std::path::Path::new(""),
        &OpenOptions { size: None, ..opts },
    )
    .expect("null with the default size");
    assert_eq!(default.size(), 1 << 30, "QEMU's null-co default");
}

#[test]
fn blkdebug_injects_eio_once_then_the_backend_keeps_serving() {
    let dir = disk_dir();
    let data = pattern(64 * 1024, 31);
    let path = image(dir.path(), "dbg.img", &data);
    let file: Arc<dyn BlockDriver> =
        Arc::new(FileDriver::open(&path, &FileOptions::default()).expect("open"));
    let dbg = Arc::new(BlkdebugDriver::new(file));
    let blk = Arc::new(BlockBackend::new(dbg.clone(), BackendOptions::default()).expect("backend"));
    dbg.add_rule(
        Rule::new(BlkdebugOp::Read)
            .range(8192..12288)
            .errno(libc::EIO)
            .once(),
    );
    let flush_rule = dbg.add_rule(Rule::new(BlkdebugOp::Flush).errno(libc::ENOSPC));
    let b = blk.clone();
    let d = dbg.clone();
    co(move || {
        let mut buf = vec![0u8; 4096];
        b.co_pread(0, &mut buf).expect("outside the rule's range");
        let e = b.co_pread(10_000, &mut buf).expect_err("injected");
        assert_eq!(e.errno(), libc::EIO);
        b.co_pread(10_000, &mut buf)
            .expect("`once`: the second read succeeds");
        assert_eq!(&buf[..], &data[10_000..14_096]);
        assert_eq!(b.co_flush().map_err(|e| e.errno()), Err(libc::ENOSPC));
        assert!(d.remove_rule(flush_rule));
        b.co_flush().expect("flush after the rule is gone");
        b.co_pwrite(0, b"still serving").expect("write");
    });
    assert_eq!(dbg.injected(), 2);
    assert_eq!(blk.in_flight(), 0);
    assert_eq!(&std::fs::read(&path).expect("read")[..13], b"still serving");
}
