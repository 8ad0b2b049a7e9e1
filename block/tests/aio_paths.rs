//! Every operation of the file driver on both blocking-I/O paths (`AioMode::Threads`: the
//! thread pool; `AioMode::IoUring`: the thread's ring), with and without O_DIRECT, in both
//! engines (coroutines; async tasks). The oracle is the file as `std::fs` reads it; the
//! driver's [`FileStats`] prove which path the requests took. The fallback (a thread without a
//! ring) is in `aio_fallback.rs`: it changes a process-global setting.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{
    AioMode, AlignedBuf, BackendOptions, BlkdebugDriver, BlkdebugOp, BlockBackend, BlockDriver,
    BlockStatus, CacheMode, FileDriver, FileOptions, Format, OpenOptions, Qcow2Driver, Result,
    Rule,
};
use common::{co, disk_dir, image, pattern, skip};
use runtime::block_on;

const KIB: u64 = 1024;
const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Coroutine,
    Async,
}

/// Whether this thread's context has an io_uring; skips loudly (fails under CI) if not.
fn have_ring(test: &str) -> bool {
    let ok = runtime::AioContext::with_current(|c| c.has_io_uring());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: io_uring is required when CI=true"
        );
        skip(test, "this thread's event loop has no io_uring");
    }
    ok
}

fn open_file(path: &Path, aio: AioMode, cache: CacheMode) -> Arc<FileDriver> {
    let opts = FileOptions {
        aio,
        cache,
        ..FileOptions::default()
    };
    Arc::new(FileDriver::open(path, &opts).expect("open the file driver"))
}

/// One backend, driven by one engine: each call is one coroutine or one `block_on`.
struct Io {
    blk: Arc<BlockBackend>,
    engine: Engine,
}

impl Io {
    fn pwrite(&self, off: u64, data: &[u8]) -> Result<()> {
        match self.engine {
            Engine::Coroutine => {
                let (b, d) = (self.blk.clone(), data.to_vec());
                co(move || b.co_pwrite(off, &d))
            }
            Engine::Async => block_on(self.blk.pwrite_async(off, data)),
        }
    }

    fn pread(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || {
                    let mut buf = vec![0xa5; len];
                    b.co_pread(off, &mut buf).map(|()| buf)
                })
            }
            Engine::Async => block_on(async {
                let mut buf = vec![0xa5; len];
                self.blk.pread_async(off, &mut buf).await.map(|()| buf)
            }),
        }
    }

    fn flush(&self) -> Result<()> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || b.co_flush())
            }
            Engine::Async => block_on(self.blk.flush_async()),
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || b.co_pwrite_zeroes(off, len, may_unmap))
            }
            Engine::Async => block_on(self.blk.pwrite_zeroes_async(off, len, may_unmap)),
        }
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || b.co_pdiscard(off, len))
            }
            Engine::Async => block_on(self.blk.pdiscard_async(off, len)),
        }
    }

    fn block_status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || b.co_block_status(off, len))
            }
            Engine::Async => block_on(self.blk.block_status_async(off, len)),
        }
    }

    fn truncate(&self, size: u64) -> Result<()> {
        match self.engine {
            Engine::Coroutine => {
                let b = self.blk.clone();
                co(move || b.co_truncate(size))
            }
            Engine::Async => block_on(self.blk.truncate_async(size)),
        }
    }
}

/// Reads `len` bytes at `off` from the driver itself (no backend checks, so past EOF too),
/// into an O_DIRECT-aligned buffer.
fn driver_read(file: &Arc<FileDriver>, engine: Engine, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = AlignedBuf::zeroed(len, 4096).expect("aligned buffer");
    buf.fill(0xa5);
    match engine {
        Engine::Coroutine => {
            let f = file.clone();
            co(move || f.co_preadv(off, &mut buf).map(|()| buf.to_vec()))
        }
        Engine::Async => block_on(async {
            let path = block::AsyncPath::of(&**file).expect("the file driver has an async path");
            path.preadv(off, &mut buf).await.map(|()| buf.to_vec())
        }),
    }
}

fn driver_write(file: &Arc<FileDriver>, engine: Engine, off: u64, data: &[u8]) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(data.len(), 4096).expect("aligned buffer");
    buf.copy_from_slice(data);
    match engine {
        Engine::Coroutine => {
            let f = file.clone();
            co(move || f.co_pwritev(off, &buf))
        }
        Engine::Async => block_on(async {
            let path = block::AsyncPath::of(&**file).expect("the file driver has an async path");
            path.pwritev(off, &buf).await
        }),
    }
}

#[track_caller]
fn assert_file_is(path: &Path, model: &[u8], what: &str) {
    let on_disk = std::fs::read(path).expect("read the image with std::fs");
    assert_eq!(on_disk.len(), model.len(), "{what}: file size");
    if let Some(i) = (0..model.len()).find(|&i| on_disk[i] != model[i]) {
        panic!(
            "{what}: the file differs from the model at byte {i} ({:#x} != {:#x})",
            on_disk[i], model[i]
        );
    }
}

/// Every operation through a backend over a file driver with `aio` and `cache`, in `engine`;
/// then the path the requests took.
fn exercise(aio: AioMode, cache: CacheMode, engine: Engine) {
    let what = format!("{aio:?}/{cache:?}/{engine:?}");
    let dir = disk_dir();
    let mut model = pattern(SIZE as usize, 1);
    let path = image(dir.path(), "img", &model);
    let file = open_file(&path, aio, cache);
    assert_eq!(file.is_direct(), cache == CacheMode::None);
    let blk = BlockBackend::new(file.clone(), BackendOptions::default()).expect("backend");
    let io = Io {
        blk: Arc::new(blk),
        engine,
    };

    // Writes, aligned and not (the backend pads the unaligned ones with a read-modify-write
    // under O_DIRECT), each checked against the file after a flush.
    let writes: [(u64, usize, u8); 6] = [
        (0, 4096, 7),
        (64 * KIB, 128 * 1024, 8),
        (4095, 3, 9),
        (100_001, 65_537, 10),
        (SIZE - 10, 10, 11),
        (700 * KIB + 1, 1, 12),
    ];
    for (off, len, seed) in writes {
        let data = pattern(len, seed);
        io.pwrite(off, &data)
            .unwrap_or_else(|e| panic!("{what}: write {len} at {off}: {e}"));
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    io.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
    assert_file_is(&path, &model, &format!("{what}: after the writes"));

    // Reads: the whole image, and pieces at odd places.
    let whole = io.pread(0, SIZE as usize).expect("read all");
    assert!(
        whole == model,
        "{what}: the whole read differs from the model"
    );
    for (off, len) in [(0u64, 512usize), (4094, 5), (99_999, 777), (SIZE - 1, 1)] {
        let got = io.pread(off, len).expect("read a piece");
        assert_eq!(
            got,
            &model[off as usize..off as usize + len],
            "{what}: read {len} at {off}"
        );
    }

    // Write zeroes: with ZERO_RANGE (no unmap) and with PUNCH_HOLE (may_unmap), and discard.
    io.write_zeroes(8 * KIB, 8 * KIB, false)
        .expect("write zeroes without unmap");
    model[8 * 1024..16 * 1024].fill(0);
    io.write_zeroes(128 * KIB, 64 * KIB, true)
        .expect("write zeroes with unmap");
    model[128 * 1024..192 * 1024].fill(0);
    io.discard(256 * KIB, 64 * KIB).expect("discard");
    model[256 * 1024..320 * 1024].fill(0);
    io.flush().expect("flush");
    assert_file_is(&path, &model, &format!("{what}: after zeroes and discard"));
    let back = io.pread(0, SIZE as usize).expect("read all");
    assert!(back == model, "{what}: reads after zeroing differ");

    // Block status: the punched hole and the discarded range read as zeros, written data as data.
    let (st, n) = io.block_status(0, 4096).expect("status of data");
    assert_eq!((st, n), (BlockStatus::Data, 4096), "{what}: status at 0");
    for off in [128 * KIB, 256 * KIB] {
        let (st, n) = io.block_status(off, 64 * KIB).expect("status of a hole");
        assert_eq!(
            (st, n),
            (BlockStatus::Zero, 64 * KIB),
            "{what}: status at {off}"
        );
    }

    // Which path did the blocking requests take?
    let s = file.stats();
    match aio {
        AioMode::Threads => {
            assert_eq!(s.ring_requests, 0, "{what}: {s:?}");
            assert!(s.pool_requests > 0, "{what}: {s:?}");
        }
        _ if cache == CacheMode::None => {
            // O_DIRECT never tries inline: every write, flush and fallocate had to wait, and
            // waited on the ring.
            assert!(s.ring_requests >= writes.len() as u64, "{what}: {s:?}");
            assert_eq!(s.pool_requests, 0, "{what}: {s:?}");
        }
        _ => {
            // Buffered writes of a regular file go to the write lane on the pool even with
            // io_uring (FileDriver::ring_writes, measured faster); ext4 refuses buffered
            // RWF_NOWAIT writes, so each one did. Flushes and fallocates took the ring.
            assert!(s.pool_requests >= writes.len() as u64, "{what}: {s:?}");
            assert!(s.ring_requests > 0, "{what}: {s:?}");
        }
    }

    // Truncate (ftruncate is on the pool on both paths): grow, read the new zeros, shrink.
    io.truncate(SIZE + 64 * KIB).expect("grow");
    assert_eq!(io.blk.size(), SIZE + 64 * KIB);
    model.resize((SIZE + 64 * KIB) as usize, 0);
    assert_file_is(&path, &model, &format!("{what}: after growing"));
    let tail = io
        .pread(SIZE - 4096, 8192)
        .expect("read across the old end");
    assert_eq!(tail, &model[(SIZE - 4096) as usize..(SIZE + 4096) as usize]);
    io.truncate(SIZE).expect("shrink");
    model.truncate(SIZE as usize);
    assert_file_is(&path, &model, &format!("{what}: after shrinking"));
    let after = file.stats();
    if aio == AioMode::Threads {
        assert_eq!(after.ring_requests, 0, "{what}: {after:?}");
    } else if cache == CacheMode::None {
        assert_eq!(
            after.pool_requests - s.pool_requests,
            2,
            "{what}: the two truncates and nothing else went to the pool: {after:?}"
        );
    }

    // Past EOF, the driver reads zeros (a short read): across the end, and wholly past it.
    let got = driver_read(&file, engine, SIZE - 4096, 12288).expect("read across EOF");
    assert_eq!(&got[..4096], &model[(SIZE - 4096) as usize..]);
    assert!(
        got[4096..].iter().all(|&b| b == 0),
        "{what}: zeros past EOF"
    );
    let got = driver_read(&file, engine, SIZE + 4096, 4096).expect("read past EOF");
    assert!(got.iter().all(|&b| b == 0), "{what}: zeros wholly past EOF");
    // A file size that is not a multiple of the alignment: with O_DIRECT the read stops short
    // at EOF and the next, unaligned, offset is refused with EINVAL — which means EOF.
    let extra = pattern(100, 13);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for std write")
        .write_all_at(&extra, SIZE)
        .expect("append 100 bytes");
    let got = driver_read(&file, engine, SIZE, 4096).expect("read a partial last block");
    assert_eq!(&got[..100], &extra[..], "{what}: the partial block");
    assert!(got[100..].iter().all(|&b| b == 0), "{what}: zeros after it");
    if aio != AioMode::Threads {
        assert_eq!(file.stats().pool_requests, after.pool_requests, "{what}");
    }
    io.blk.close().expect("close");
    assert_eq!(io.blk.in_flight(), 0);
}

macro_rules! paths {
    ($($name:ident: $aio:ident, $cache:ident, $engine:ident;)*) => {$(
        #[test]
        fn $name() {
            if AioMode::$aio == AioMode::IoUring && !have_ring(stringify!($name)) {
                return;
            }
            exercise(AioMode::$aio, CacheMode::$cache, Engine::$engine);
        }
    )*};
}

paths! {
    threads_writeback_coroutine: Threads, Writeback, Coroutine;
    threads_writeback_async: Threads, Writeback, Async;
    threads_direct_coroutine: Threads, None, Coroutine;
    threads_direct_async: Threads, None, Async;
    uring_writeback_coroutine: IoUring, Writeback, Coroutine;
    uring_writeback_async: IoUring, Writeback, Async;
    uring_direct_coroutine: IoUring, None, Coroutine;
    uring_direct_async: IoUring, None, Async;
}

/// `Auto` is `IoUring` on a thread with a ring.
#[test]
fn auto_uses_the_ring() {
    if !have_ring("auto_uses_the_ring") {
        return;
    }
    let dir = disk_dir();
    let path = image(dir.path(), "auto.img", &pattern(64 * 1024, 2));
    let file = open_file(&path, AioMode::Auto, CacheMode::None);
    let data = pattern(8192, 3);
    driver_write(&file, Engine::Coroutine, 4096, &data).expect("write");
    let got = driver_read(&file, Engine::Async, 4096, 8192).expect("read");
    assert_eq!(got, data);
    let s = file.stats();
    assert_eq!((s.ring_requests, s.pool_requests), (2, 0), "{s:?}");
}

/// Errors on the ring path are errors: one the kernel gives (EINVAL for a misaligned O_DIRECT
/// request, bypassing the backend's padding) and EIO injected by blkdebug above the file; the
/// driver keeps serving afterwards.
#[test]
fn errors_on_the_ring_are_returned() {
    if !have_ring("errors_on_the_ring_are_returned") {
        return;
    }
    let dir = disk_dir();
    let data = pattern(64 * 1024, 4);
    let path = image(dir.path(), "err.img", &data);
    let file = open_file(&path, AioMode::IoUring, CacheMode::None);
    for engine in [Engine::Coroutine, Engine::Async] {
        let before = file.stats().ring_requests;
        let e = driver_read(&file, engine, 1, 4096).expect_err("misaligned O_DIRECT read");
        assert_eq!(e.errno(), libc::EINVAL, "{engine:?}: {e}");
        let e = driver_write(&file, engine, 513, &[1; 4096]).expect_err("misaligned write");
        assert_eq!(e.errno(), libc::EINVAL, "{engine:?}: {e}");
        assert_eq!(
            file.stats().ring_requests - before,
            2,
            "{engine:?}: both errors came from the ring: {:?}",
            file.stats()
        );
        let got = driver_read(&file, engine, 0, 4096).expect("an aligned read still works");
        assert_eq!(got, &data[..4096]);
    }
    assert_file_is(&path, &data, "after the refused write");

    let dbg = Arc::new(BlkdebugDriver::new(file.clone()));
    dbg.add_rule(
        Rule::new(BlkdebugOp::Read)
            .range(8192..12288)
            .errno(libc::EIO),
    );
    dbg.add_rule(
        Rule::new(BlkdebugOp::Write)
            .range(16384..20480)
            .errno(libc::EIO),
    );
    dbg.add_rule(Rule::new(BlkdebugOp::Flush).errno(libc::EIO).once());
    let blk = Arc::new(BlockBackend::new(dbg.clone(), BackendOptions::default()).expect("backend"));
    for engine in [Engine::Coroutine, Engine::Async] {
        let io = Io {
            blk: blk.clone(),
            engine,
        };
        let e = io.pread(8000, 1000).expect_err("injected read error");
        assert_eq!(e.errno(), libc::EIO, "{engine:?}: {e}");
        let e = io
            .pwrite(16384, &[9; 4096])
            .expect_err("injected write error");
        assert_eq!(e.errno(), libc::EIO, "{engine:?}: {e}");
        let got = io.pread(0, 8192).expect("outside the rules");
        assert_eq!(got, &data[..8192], "{engine:?}");
        io.pwrite(32768, &data[32768..36864])
            .expect("a write outside the rules");
    }
    let e = Io {
        blk: blk.clone(),
        engine: Engine::Coroutine,
    }
    .flush()
    .expect_err("injected flush error");
    assert_eq!(e.errno(), libc::EIO);
    assert!(dbg.injected() >= 5, "{}", dbg.injected());
    assert_file_is(&path, &data, "after the injected errors");
    assert_eq!(file.stats().pool_requests, 0, "{:?}", file.stats());
}

/// qcow2 over a file on the ring path with O_DIRECT: what it writes, qemu-img reads back, and
/// the image checks clean.
#[test]
fn qcow2_on_the_ring() {
    if !have_ring("qcow2_on_the_ring") || !common::qemu::have_qemu("qcow2_on_the_ring") {
        return;
    }
    let dir = disk_dir();
    let size = 8 << 20;
    let qcow2 = common::qemu::create_qcow2(dir.path(), "q.qcow2", "cluster_size=65536", size);
    let raw = dir.path().join("oracle.raw");
    let oracle = std::fs::File::create(&raw).expect("create the raw oracle");
    oracle.set_len(size).expect("size the oracle");

    for engine in [Engine::Coroutine, Engine::Async] {
        let file = open_file(&qcow2, AioMode::IoUring, CacheMode::None);
        let chain = block::qcow2::ChainOptions {
            cache: CacheMode::None,
            aio: AioMode::IoUring,
            ..Default::default()
        };
        let driver = Qcow2Driver::open_chain(file.clone(), &qcow2, &chain).expect("open qcow2");
        let io = Io {
            blk: Arc::new(
                BlockBackend::new(Arc::new(driver), BackendOptions::default()).expect("backend"),
            ),
            engine,
        };
        let seed = if engine == Engine::Coroutine { 20 } else { 40 };
        let writes = [
            (0u64, 4096usize),
            (65_536 - 100, 200),
            (1 << 20, 192 * 1024),
            (3 * (1 << 20) + 7, 70_000),
            (size - 512, 512),
        ];
        for (i, (off, len)) in writes.into_iter().enumerate() {
            let base = if engine == Engine::Async { 4 << 20 } else { 0 };
            let off = (off + base).min(size - len as u64);
            let data = pattern(len, seed + i as u8);
            io.pwrite(off, &data).expect("qcow2 write");
            oracle.write_all_at(&data, off).expect("oracle write");
            let back = io.pread(off, len).expect("qcow2 read");
            assert!(back == data, "{engine:?}: read back at {off}");
        }
        io.write_zeroes(1 << 20, 65_536, true)
            .expect("qcow2 zeroes");
        oracle
            .write_all_at(&[0; 65_536], 1 << 20)
            .expect("oracle zeroes");
        io.flush().expect("qcow2 flush");
        io.blk.close().expect("close qcow2");
        let s = file.stats();
        // Data and metadata I/O on the ring; qcow2 grows its file with ftruncate, which is
        // on the pool on both paths.
        assert!(s.ring_requests > s.pool_requests, "{engine:?}: {s:?}");
        drop(io);
        drop(file);
        qemu_img_ok(&["check", "-q"], &qcow2, None);
        qemu_img_ok(
            &["compare", "-q", "-f", "qcow2", "-F", "raw"],
            &qcow2,
            Some(&raw),
        );
    }

    // The same through open_image, the CLI's way.
    let opts = OpenOptions {
        format: Format::Qcow2,
        cache: CacheMode::None,
        aio: AioMode::IoUring,
        ..OpenOptions::default()
    };
    let blk = block::open_image(&qcow2, &opts).expect("open_image qcow2");
    let io = Io {
        blk,
        engine: Engine::Coroutine,
    };
    let data = pattern(10_000, 99);
    io.pwrite(5 << 20, &data).expect("write");
    oracle.write_all_at(&data, 5 << 20).expect("oracle");
    let whole = io.pread(0, size as usize).expect("read all");
    let expected = std::fs::read(&raw).expect("read the oracle");
    assert!(
        whole == expected,
        "open_image: the qcow2 reads differ from the oracle"
    );
    io.blk.close().expect("close");
    drop(io);
    qemu_img_ok(&["check", "-q"], &qcow2, None);
    qemu_img_ok(
        &["compare", "-q", "-f", "qcow2", "-F", "raw"],
        &qcow2,
        Some(&raw),
    );
}

#[track_caller]
fn qemu_img_ok(args: &[&str], image: &Path, other: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args).arg(image);
    if let Some(o) = other {
        cmd.arg(o);
    }
    let out = cmd.output().expect("run qemu-img");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
