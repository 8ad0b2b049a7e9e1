//! `--aio threads|io_uring|auto`: the io_uring path serves O_DIRECT I/O end to end, the
//! daemon says which event loops it runs, and a kernel without io_uring (simulated with the
//! hidden `--inject-no-io-uring`) falls back under `auto` and is refused under `io_uring`.
//! `aio_seccomp.rs` forces the same fallback with a real seccomp filter.

use std::fs;
use std::os::unix::fs::FileExt;

use tests::*;

const KIB: usize = 1024;

/// A buffer of `len` bytes at a 4 KiB-aligned address, inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

/// `--aio io_uring --cache none`: O_DIRECT writes through the mount reach the image file,
/// O_DIRECT reads give them back, and the daemon runs io_uring event loops.
#[test]
fn io_uring_with_cache_none_serves_direct_io() {
    require!(fuse_available());
    let dir = disk_workdir();
    if !supports_o_direct(dir.path()) {
        skip("the temporary directory does not support O_DIRECT");
        return;
    }
    let size = 4 * 1024 * KIB;
    let img = dir.path().join("uring.img");
    let mut model = random_image(&img, size, 1);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = Export::start(&img, &mnt, &["--aio", "io_uring", "--cache", "none"]);
    let f = open_direct(e.path());
    let mut rng = Prng::new(7);
    let mut storage = Vec::new();
    for i in 0..32u64 {
        let len = [4 * KIB, 64 * KIB, 128 * KIB, 512 * KIB][i as usize % 4];
        let off = rng.below(((size - len) / 4096) as u64) * 4096;
        let buf = aligned(&mut storage, len);
        Prng::new(100 + i).fill(buf);
        f.write_all_at(buf, off)
            .unwrap_or_else(|err| panic!("O_DIRECT write {len} at {off}: {err}\n{}", e.logs()));
        model[off as usize..off as usize + len].copy_from_slice(buf);
    }
    f.sync_all().expect("fsync");
    let back = aligned(&mut storage, size);
    f.read_exact_at(back, 0)
        .expect("O_DIRECT read of everything");
    assert!(
        back == &model[..],
        "the O_DIRECT reads differ from what was written"
    );
    drop(f);
    let x = e.stop_ok();
    let log = format!("{}{}", x.stderr, x.stdout);
    assert!(log.contains("event loops: io_uring"), "{x}");
    let on_disk = fs::read(&img).expect("read the image");
    assert!(
        on_disk == model,
        "the image file differs from what was written"
    );
}

/// `--aio threads` runs epoll event loops (the thread pool does the blocking I/O) — with the
/// `/dev/fuse` transport; the io_uring transport needs io_uring loops (`transport.rs`).
#[test]
fn threads_runs_epoll_loops() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("threads.img");
    let model = random_image(&img, 256 * KIB, 2);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = Export::start(&img, &mnt, &["--aio", "threads", "--transport", "dev"]);
    let got = fs::read(e.path()).expect("read the export");
    assert!(got == model);
    let x = e.stop_ok();
    assert!(x.stderr.contains("event loops: epoll"), "{x}");
    assert!(!x.stderr.contains("event loops: io_uring"), "{x}");
}

/// `--aio auto` takes the ring for an image on a disk, and the thread pool for one in memory
/// (tmpfs), where nothing waits for a device.
#[test]
fn auto_picks_the_ring_on_disk_and_the_pool_in_memory() {
    require!(fuse_available());
    for (dir, ring) in [(disk_workdir(), true), (workdir(), false)] {
        if !ring && !block_is_in_memory(dir.path()) {
            eprintln!("SKIP: /dev/shm is not tmpfs here; the in-memory case is not checked");
            continue;
        }
        let img = dir.path().join("auto.img");
        let model = random_image(&img, 256 * KIB, 3);
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").expect("mountpoint");
        let mut e = Export::start(&img, &mnt, &["--aio", "auto", "--transport", "dev"]);
        let got = fs::read(e.path()).expect("read the export");
        assert!(got == model);
        let x = e.stop_ok();
        if ring {
            assert!(x.stderr.contains("event loops: io_uring"), "{x}");
        } else {
            assert!(x.stderr.contains("nothing waits for a device"), "{x}");
            assert!(x.stderr.contains("event loops: epoll"), "{x}");
        }
    }
}

/// Whether `dir` is on tmpfs (statfs), without the block crate.
fn block_is_in_memory(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut sfs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid C string and `sfs` a writable statfs for the kernel to fill.
    if unsafe { libc::statfs(c.as_ptr(), sfs.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded, so it initialised the struct.
    let t = unsafe { sfs.assume_init() }.f_type;
    #[allow(clippy::unnecessary_cast)]
    let t = t as i64;
    t == 0x0102_1994
}

/// Without io_uring, `auto` warns and serves with epoll loops and the thread pool.
#[test]
fn auto_falls_back_without_io_uring() {
    require!(fuse_available());
    let dir = disk_workdir();
    let img = dir.path().join("fallback.img");
    let mut model = random_image(&img, 1024 * KIB, 3);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    // `--aio auto` explicitly: a suite-wide CORO_FUSE_AIO=io_uring would make this exit.
    let mut e = Export::start(
        &img,
        &mnt,
        &["--inject-no-io-uring", "--aio", "auto", "--cache", "none"],
    );
    let f = open_rw(e.path());
    let data = random_bytes(4, 200 * KIB);
    f.write_all_at(&data, 12_345).expect("write");
    model[12_345..12_345 + data.len()].copy_from_slice(&data);
    f.sync_all().expect("fsync");
    drop(f);
    let got = fs::read(e.path()).expect("read the export");
    assert!(
        got == model,
        "the export reads differ from what was written"
    );
    let x = e.stop_ok();
    let log = format!("{}{}", x.stderr, x.stdout);
    assert!(log.contains("io_uring is not available"), "{x}");
    assert!(log.contains("event loops: epoll"), "{x}");
    assert!(!log.contains("event loops: io_uring"), "{x}");
    assert!(fs::read(&img).expect("read the image") == model);
}

/// Without io_uring, `--aio io_uring` is refused before mounting: status 1 and a message.
#[test]
fn io_uring_required_but_missing_exits_1() {
    let dir = workdir();
    let img = dir.path().join("refused.img");
    random_image(&img, 64 * KIB, 5);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let before = fs::read(&img).expect("read the image");
    let args = [
        "--inject-no-io-uring".as_ref(),
        "--aio".as_ref(),
        "io_uring".as_ref(),
        img.as_os_str(),
        mnt.as_os_str(),
    ];
    let out = coro_fuse_expect_exit(&args, Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("--aio io_uring: io_uring is not available"),
        "{out}"
    );
    assert_eq!(fuse_mounts_at(&mnt), 0, "nothing may be mounted: {out}");
    assert!(fs::read(&img).expect("read the image") == before);
}
