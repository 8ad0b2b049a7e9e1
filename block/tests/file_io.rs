//! The file driver through a `BlockBackend`: data, ranges, permissions, holes, O_DIRECT, errors.
//! The oracle is always the file as `std::fs` reads it.

mod common;

use std::path::Path;
use std::sync::Arc;

use block::{
    open_image, BackendOptions, BlockBackend, BlockDriver, BlockError, BlockStatus, CacheMode,
    FileDriver, FileOptions, Format, OpenOptions, RawDriver, RawOptions,
};
use common::{co, disk_dir, image, pattern, skip, Lcg};

const KIB: u64 = 1024;

fn raw_rw() -> OpenOptions {
    OpenOptions {
        format: Format::Raw,
        ..OpenOptions::default()
    }
}

#[test]
fn round_trip_matches_std_fs() {
    let dir = disk_dir();
    let mut model = pattern(1 << 20, 1);
    let path = image(dir.path(), "rt.img", &model);
    let blk = open_image(&path, &raw_rw()).expect("open");
    assert_eq!(blk.size(), 1 << 20);
    assert_eq!(blk.format_name(), "raw");

    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(4096, 7)),
        (4095, pattern(3, 8)),
        (100_001, pattern(65_537, 9)),
        ((1 << 20) - 10, pattern(10, 10)),
    ];
    for (off, data) in &writes {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let b = blk.clone();
    let reads = co(move || {
        for (off, data) in &writes {
            b.co_pwrite(*off, data).expect("write");
        }
        b.co_flush().expect("flush");
        let mut whole = vec![0u8; 1 << 20];
        b.co_pread(0, &mut whole).expect("read all");
        let mut piece = vec![0u8; 777];
        b.co_pread(99_999, &mut piece).expect("read piece");
        (whole, piece)
    });
    let on_disk = std::fs::read(&path).expect("read back with std::fs");
    assert!(on_disk == model, "file content differs from the model");
    assert!(reads.0 == model, "backend read differs from the model");
    assert_eq!(reads.1, &model[99_999..99_999 + 777]);
    assert_eq!(blk.in_flight(), 0);
    blk.close().expect("close");
}

#[test]
fn requests_past_eof_are_out_of_range() {
    let dir = disk_dir();
    let path = image(dir.path(), "eof.img", &pattern(4096, 2));
    let blk = open_image(&path, &raw_rw()).expect("open");
    let b = blk.clone();
    co(move || {
        let mut buf = [0u8; 200];
        for (off, len) in [(4000, 200), (4096, 1), (u64::MAX, 1)] {
            let e = b.co_pread(off, &mut buf[..len]).expect_err("read past EOF");
            assert!(matches!(e, BlockError::OutOfRange { .. }), "{e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        b.co_pread(4096, &mut [])
            .expect("an empty read at EOF is fine");
        let e = b.co_pwrite(4090, &[1; 10]).expect_err("write across EOF");
        assert!(
            matches!(
                e,
                BlockError::OutOfRange {
                    offset: 4090,
                    len: 10,
                    size: 4096
                }
            ),
            "{e}"
        );
        assert!(b.co_pwrite_zeroes(4096, 1, false).is_err());
        assert!(b.co_pdiscard(0, 4097).is_err());
        assert!(matches!(
            b.co_block_status(4096, 1),
            Err(BlockError::OutOfRange { .. })
        ));
    });
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        4096,
        "nothing grew"
    );
    assert_eq!(
        blk.in_flight(),
        0,
        "failed requests leave the in-flight count too"
    );
}

#[test]
fn write_beyond_eof_extends_the_file_and_truncate_updates_size() {
    let dir = disk_dir();
    let path = image(dir.path(), "grow.img", &pattern(4096, 3));
    let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
    let opts = BackendOptions {
        read_only: false,
        write_beyond_eof: true,
        ..BackendOptions::default()
    };
    let b = BlockBackend::new(Arc::new(file), opts).expect("backend");
    co(move || {
        b.co_pwrite(10_000, b"tail").expect("write past EOF grows");
        assert_eq!(b.size(), 10_004);
        b.co_pwrite_zeroes(20_000, 100, false)
            .expect("zeroes past EOF grow");
        assert_eq!(b.size(), 20_100);
        b.co_truncate(5000).expect("shrink");
        assert_eq!(b.size(), 5000);
    });
    let data = std::fs::read(&path).expect("read");
    assert_eq!(data.len(), 5000);
    assert_eq!(&data[..4096], &pattern(4096, 3)[..]);
    assert!(
        data[4096..].iter().all(|&b| b == 0),
        "the gap reads as zeros"
    );
}

#[test]
fn read_only_refuses_writes() {
    let dir = disk_dir();
    let path = image(dir.path(), "ro.img", &pattern(8192, 4));
    let blk = open_image(
        &path,
        &OpenOptions {
            read_only: true,
            ..raw_rw()
        },
    )
    .expect("open");
    assert!(blk.is_read_only());
    let b = blk.clone();
    co(move || {
        let errs = [
            b.co_pwrite(0, &[0; 512]).expect_err("write"),
            b.co_pwrite_zeroes(0, 512, true).expect_err("zeroes"),
            b.co_pdiscard(0, 512).expect_err("discard"),
            b.co_truncate(0).expect_err("truncate"),
        ];
        for e in errs {
            assert!(matches!(e, BlockError::ReadOnly), "{e}");
            assert_eq!(e.errno(), libc::EROFS);
        }
        let mut buf = [0u8; 100];
        b.co_pread(50, &mut buf).expect("reads work");
        assert_eq!(&buf[..], &pattern(8192, 4)[50..150]);
        b.co_flush().expect("flushing a read-only image is a no-op");
    });
    assert_eq!(std::fs::read(&path).expect("read"), pattern(8192, 4));
}

/// Whether the filesystem of `dir` reports holes through SEEK_DATA.
fn reports_holes(dir: &Path) -> bool {
    let path = dir.join("hole-probe");
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(1 << 20).expect("set_len");
    // Deallocation is asked for: QEMU's discard=unmap (the default, ignore, keeps it).
    let unmap = OpenOptions {
        discard: block::Discard::Unmap,
        ..raw_rw()
    };
    let blk = open_image(&path, &unmap).expect("open");
    let (status, _) = co(move || blk.co_block_status(0, 1 << 20)).expect("status");
    let _ = std::fs::remove_file(&path);
    status == BlockStatus::Zero
}

fn zeroes_discard_and_block_status_in(dir: &Path, label: &str) {
    if !reports_holes(dir) {
        skip(label, "this filesystem does not report holes via SEEK_DATA");
        return;
    }
    let path = dir.join("holes.img");
    std::fs::File::create(&path)
        .expect("create")
        .set_len(MIB)
        .expect("set_len");
    let blk = open_image(&path, &raw_rw()).expect("open");
    let b = blk.clone();
    let statuses = co(move || {
        b.co_pwrite(256 * KIB, &pattern(256 * KIB as usize, 5))
            .expect("write data");
        let mut s = vec![
            b.co_block_status(0, MIB).expect("status 0"),
            b.co_block_status(256 * KIB, MIB).expect("status 256K"),
            b.co_block_status(600 * KIB, 10 * MIB)
                .expect("status past the data"),
        ];
        b.co_pwrite_zeroes(256 * KIB, 64 * KIB, true)
            .expect("zeroes with unmap");
        s.push(
            b.co_block_status(256 * KIB, 64 * KIB)
                .expect("status after punch"),
        );
        b.co_pwrite_zeroes(320 * KIB, 64 * KIB, false)
            .expect("zeroes without unmap");
        match b.co_pdiscard(384 * KIB, 64 * KIB) {
            Ok(()) => s.push(
                b.co_block_status(384 * KIB, 64 * KIB)
                    .expect("after discard"),
            ),
            Err(BlockError::NotSupported(_)) => {}
            Err(e) => panic!("discard: {e}"),
        }
        b.co_flush().expect("flush");
        s
    });
    assert_eq!(
        statuses[0],
        (BlockStatus::Zero, 256 * KIB),
        "{label}: leading hole"
    );
    assert_eq!(statuses[1], (BlockStatus::Data, 256 * KIB), "{label}: data");
    assert_eq!(
        statuses[2],
        (BlockStatus::Zero, MIB - 600 * KIB),
        "{label}: clamped at EOF"
    );
    assert_eq!(
        statuses[3],
        (BlockStatus::Zero, 64 * KIB),
        "{label}: punched hole"
    );
    if let Some(s) = statuses.get(4) {
        assert_eq!(s.0, BlockStatus::Zero, "{label}: discarded range");
    }
    let data = std::fs::read(&path).expect("read");
    assert_eq!(data.len() as u64, MIB, "{label}: KEEP_SIZE");
    assert!(
        data[256 * KIB as usize..448 * KIB as usize]
            .iter()
            .all(|&b| b == 0),
        "{label}"
    );
    assert_eq!(
        &data[448 * KIB as usize..512 * KIB as usize],
        &pattern(256 * KIB as usize, 5)[192 * KIB as usize..]
    );
}

const MIB: u64 = 1 << 20;

#[test]
fn zeroes_discard_and_block_status_on_disk() {
    zeroes_discard_and_block_status_in(disk_dir().path(), "block status on the disk filesystem");
}

#[test]
fn zeroes_discard_and_block_status_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        skip("block status on tmpfs", "/dev/shm does not exist");
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    zeroes_discard_and_block_status_in(dir.path(), "block status on tmpfs");
}

#[test]
fn errors_name_the_file_and_the_cause() {
    let dir = disk_dir();
    let missing = dir.path().join("missing.img");
    let e = open_image(&missing, &raw_rw()).expect_err("missing file");
    assert_eq!(e.errno(), libc::ENOENT);
    assert_eq!(
        e.to_string(),
        format!("cannot open '{}': no such file", missing.display())
    );

    let e = open_image(dir.path(), &raw_rw()).expect_err("a directory");
    assert_eq!(e.errno(), libc::EISDIR);
    assert!(e.to_string().ends_with("is a directory"), "{e}");
    let e = open_image(
        dir.path(),
        &OpenOptions {
            read_only: true,
            ..raw_rw()
        },
    )
    .expect_err("a directory, read-only");
    assert!(e.to_string().contains("is a directory"), "{e}");

    let secret = image(dir.path(), "secret.img", &[0; 512]);
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o000))
        .expect("chmod");
    match open_image(&secret, &raw_rw()) {
        Err(e) => {
            assert_eq!(e.errno(), libc::EACCES);
            assert!(e.to_string().ends_with("permission denied"), "{e}");
        }
        // root (CAP_DAC_OVERRIDE) ignores the mode bits; check the wording instead.
        Ok(_) => {
            skip(
                "permission denied on open",
                "running as root; checking the message only",
            );
            let e = BlockError::Open {
                path: secret.clone(),
                source: std::io::Error::from_raw_os_error(libc::EACCES),
            };
            assert_eq!(
                e.to_string(),
                format!("cannot open '{}': permission denied", secret.display())
            );
        }
    }

    let mut qcow2 = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    qcow2.resize(65_536, 0);
    let q = image(dir.path(), "disk.qcow2", &qcow2);
    // Probed as qcow2 (by its magic): its bad header is reported with the file's name.
    let e = open_image(&q, &OpenOptions::default()).expect_err("a bad qcow2 header is refused");
    assert_eq!(
        e.to_string(),
        format!(
            "image is corrupt: '{}': qcow2 header: cluster_bits 0 out of range 9..=21",
            q.display()
        )
    );
    let blk = open_image(&q, &raw_rw()).expect("an explicit raw format is not probed");
    assert_eq!(blk.size(), 65_536);
    drop(blk);
    let plain = image(dir.path(), "plain.img", &pattern(4096, 6));
    open_image(&plain, &OpenOptions::default()).expect("auto: raw");
}

/// The file driver's inline path (`RWF_NOWAIT`) vs the thread pool, measured.
fn nowait_stats_in(dir: &Path, label: &str) {
    let path = image(dir, "nowait.img", &pattern(256 * KIB as usize, 7));
    let file = Arc::new(FileDriver::open(&path, &FileOptions::default()).expect("open"));
    let node: Arc<dyn BlockDriver> = file.clone();
    let raw = RawDriver::new(node, RawOptions::default()).expect("raw");
    let blk = Arc::new(BlockBackend::new(Arc::new(raw), Default::default()).expect("backend"));
    let b = blk.clone();
    let n = 64;
    co(move || {
        let mut buf = vec![0u8; 4096];
        for i in 0..n {
            b.co_pread(i * 4096, &mut buf).expect("read");
            assert_eq!(
                &buf[..],
                &pattern(256 * KIB as usize, 7)[(i * 4096) as usize..][..4096]
            );
        }
        for i in 0..n {
            b.co_pwrite(i * 4096, &buf).expect("write");
        }
    });
    let s = file.stats();
    eprintln!("measured ({label}): 64 cached reads + 64 writes of 4 KiB: {s:?}");
    // Each request is done inline, or waits on the pool or (with a ring, the default
    // AioMode::Auto) on the thread's io_uring.
    assert_eq!(
        s.inline_reads + s.inline_writes + s.pool_requests + s.ring_requests,
        2 * n,
        "{label}: {s:?}"
    );
}

#[test]
fn nowait_inline_path_measured() {
    nowait_stats_in(disk_dir().path(), "disk filesystem");
    if Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        nowait_stats_in(shm.path(), "tmpfs");
    }
}

/// O_DIRECT open of `path`, or `None` (with a loud skip) if the filesystem refuses it.
fn open_direct(path: &Path, test: &str) -> Option<Arc<BlockBackend>> {
    match open_image(
        path,
        &OpenOptions {
            cache: CacheMode::None,
            ..raw_rw()
        },
    ) {
        Ok(blk) => Some(blk),
        Err(BlockError::Invalid(why)) if why.contains("O_DIRECT") => {
            skip(test, &why);
            None
        }
        Err(e) => panic!("O_DIRECT open: {e}"),
    }
}

#[test]
fn o_direct_unaligned_io_matches_a_model() {
    let dir = disk_dir();
    // A size that is not a multiple of any sector size: the last block is partial.
    let size = 256 * KIB as usize + 1000;
    let mut model = pattern(size, 11);
    let path = image(dir.path(), "direct.img", &model);
    let Some(blk) = open_direct(&path, "O_DIRECT unaligned I/O") else {
        return;
    };
    let align = blk.request_alignment();
    eprintln!("measured: O_DIRECT request alignment on the disk filesystem = {align}");
    assert!(align >= 512 && align.is_power_of_two(), "alignment {align}");

    let b = blk.clone();
    let mut m = model.clone();
    let model_after = co(move || {
        let mut rng = Lcg(42);
        // A heap buffer one byte past its allocation's start: misaligned in memory, too.
        let mut storage = vec![0u8; 70_001];
        for round in 0..300 {
            let off = rng.below(size as u64) as usize;
            let len = (rng.below(20_000) as usize + 1).min(size - off);
            match rng.below(3) {
                0 => {
                    let buf = &mut storage[1..1 + len];
                    b.co_pread(off as u64, buf).expect("read");
                    assert!(buf == &m[off..off + len], "round {round}: read {off}+{len}");
                }
                1 => {
                    let data = pattern(len, round as u8);
                    storage[1..1 + len].copy_from_slice(&data);
                    b.co_pwrite(off as u64, &storage[1..1 + len])
                        .expect("write");
                    m[off..off + len].copy_from_slice(&data);
                }
                _ => {
                    b.co_pwrite_zeroes(off as u64, len as u64, round % 2 == 0)
                        .expect("zeroes");
                    m[off..off + len].fill(0);
                }
            }
        }
        // The very last bytes, in the partial block.
        b.co_pwrite(size as u64 - 3, b"END")
            .expect("write the tail");
        m[size - 3..].copy_from_slice(b"END");
        b.co_flush().expect("flush");
        m
    });
    model = model_after;
    let on_disk = std::fs::read(&path).expect("read");
    assert_eq!(
        on_disk.len(),
        size,
        "padded writes must not change the file size"
    );
    assert!(
        on_disk == model,
        "O_DIRECT file content differs from the model"
    );
    assert_eq!(blk.in_flight(), 0);
}

#[test]
fn o_direct_concurrent_unaligned_writes_are_serialised() {
    let dir = disk_dir();
    let size = 64 * KIB as usize;
    let path = image(dir.path(), "rmw.img", &vec![0xee; size]);
    let Some(blk) = open_direct(&path, "O_DIRECT serialising writes") else {
        return;
    };
    // 100-byte writes: disjoint, but several share each 512-byte block, so every one is a
    // read-modify-write; without serialisation the thread pool runs them in parallel and one
    // write-back undoes another.
    let n = size / 100;
    let mut handles = Vec::new();
    for k in 0..n {
        let b = blk.clone();
        handles.push(runtime::spawn(move || {
            b.co_pwrite((k * 100) as u64, &[k as u8; 100])
                .expect("write")
        }));
    }
    for h in handles {
        if let Err(p) = h.join() {
            panic!("{p}");
        }
    }
    let data = std::fs::read(&path).expect("read");
    for k in 0..n {
        assert!(
            data[k * 100..k * 100 + 100].iter().all(|&b| b == k as u8),
            "write {k} was lost"
        );
    }
    assert!(data[n * 100..].iter().all(|&b| b == 0xee));
}
