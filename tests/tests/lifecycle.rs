//! Stopping: SIGTERM/SIGINT drain and flush (no fsync'ed write is lost), an external
//! `umount`/`fusermount3 -u` ends the process with status 0, a lazy unmount waits for the
//! last user, and an idle export does not spin.

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tests::*;

const BLOCK: usize = 64 * 1024;

fn block_pattern(i: u64) -> Vec<u8> {
    let mut b = random_bytes(0xb10c_0000 + i, BLOCK);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// A writer thread writes numbered blocks, each followed by fsync, and records what fsync
/// acknowledged, while readers keep other requests in flight; SIGTERM arrives mid-way. The daemon must exit 0, unmount, and every
/// acknowledged block must be in the image.
#[test]
fn sigterm_during_writes_keeps_every_fsynced_block() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let blocks = 512u64;
    sparse_image(&img, blocks * BLOCK as u64);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let acked = Arc::new(AtomicU64::new(0));
    let p = e.path().to_path_buf();
    let a = acked.clone();
    let writer = thread::spawn(move || -> String {
        let f = match fs::OpenOptions::new().write(true).open(&p) {
            Ok(f) => f,
            Err(e) => return format!("open: {e}"),
        };
        for i in 0..blocks {
            if let Err(e) = f.write_all_at(&block_pattern(i), i * BLOCK as u64) {
                return format!("write of block {i}: {e}");
            }
            if let Err(e) = f.sync_all() {
                return format!("fsync after block {i}: {e}");
            }
            a.store(i + 1, Ordering::SeqCst);
        }
        "finished all blocks before the signal".into()
    });
    // Readers keep more requests in flight while the daemon drains.
    let readers: Vec<_> = (0..3u64)
        .map(|t| {
            let p = e.path().to_path_buf();
            thread::spawn(move || {
                let Ok(f) = fs::File::open(&p) else { return };
                let mut buf = vec![0u8; 256 * 1024];
                let mut rng = Prng::new(t);
                while f
                    .read_at(&mut buf, rng.below(blocks * BLOCK as u64))
                    .is_ok()
                {}
            })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || acked.load(Ordering::SeqCst)
            >= 16),
        "the writer made no progress: {} blocks acknowledged\n{}",
        acked.load(Ordering::SeqCst),
        e.logs()
    );
    let x = e.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(writer.is_finished() && readers.iter().all(|r| r.is_finished()))
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        writer.is_finished(),
        "the writer is still blocked 15 s after the daemon exited"
    );
    assert!(
        readers.iter().all(|r| r.is_finished()),
        "a reader is still blocked 15 s after the daemon exited"
    );
    for r in readers {
        r.join().unwrap();
    }
    let how = writer.join().unwrap();
    let n = acked.load(Ordering::SeqCst);
    assert_eq!(
        x.code(),
        Some(0),
        "SIGTERM should end coro-fuse with status 0: {x}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || !e.is_mounted()),
        "still mounted after SIGTERM: {x}"
    );
    let image = read_all(&img);
    for i in 0..n {
        let at = i as usize * BLOCK;
        assert_same_bytes(
            &image[at..at + BLOCK],
            &block_pattern(i),
            &format!("fsync-acknowledged block {i} of {n} (writer ended with: {how})"),
        );
    }
    eprintln!("{n} blocks acknowledged; writer ended with: {how}");
}

/// SIGINT is a clean stop too: status 0, unmounted, data flushed.
#[test]
fn sigint_stops_cleanly() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    let mut data = random_image(&img, 1 << 20, 3);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    open_rw(e.path()).write_all_at(&[9u8; 3000], 777).unwrap();
    data[777..3777].fill(9);
    let x = e.stop_with(libc::SIGINT);
    assert_eq!(x.code(), Some(0), "SIGINT: {x}");
    assert!(
        wait_until(Duration::from_secs(5), || !e.is_mounted()),
        "still mounted after SIGINT"
    );
    assert_same_bytes(&read_all(&img), &data, "image after SIGINT");
}

fn external_unmount(tool_name: &str, args: &[&str]) {
    let dir = workdir();
    let img = dir.path().join("t.img");
    let mut data = random_image(&img, 2 << 20, 4);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let f = open_rw(e.path());
    f.write_all_at(&[0x42; 5000], 100_000).unwrap();
    data[100_000..105_000].fill(0x42);
    drop(f);
    // Right after the close, a plain unmount may still find the mount busy (EBUSY): a
    // reference to the file can outlive close() briefly (a child forked by a test running in
    // parallel holds the fd table until it execs). Retry, as a user would.
    let mut tries = 0;
    loop {
        let mut c = tool(tool_name);
        c.args(args).arg(&mnt);
        let out = run(&mut c);
        if out.success() {
            break;
        }
        tries += 1;
        assert!(
            tries < 50 && out.all().contains("busy"),
            "`{tool_name}` failed: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let x = e.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "coro-fuse still runs 10 s after `{tool_name}`\n{}",
            e.logs()
        )
    });
    assert_eq!(
        x.code(),
        Some(0),
        "exit status after an external `{tool_name}`: {x}"
    );
    assert!(!e.is_mounted());
    assert_same_bytes(&read_all(&img), &data, "image after an external unmount");
}

/// `umount MOUNTPOINT` from outside: the process notices, flushes and exits 0 within seconds.
#[test]
fn external_umount_ends_the_process() {
    require!(fuse_available(), is_root(), have_tools(&["umount"]));
    external_unmount("umount", &[]);
}

/// The same with `fusermount3 -u`.
#[test]
fn external_fusermount_u_ends_the_process() {
    require!(fuse_available(), have_tools(&["fusermount3"]));
    external_unmount("fusermount3", &["-u"]);
}

/// `umount -l` while a file is open: the file keeps working until it is closed, then the
/// process exits 0.
#[test]
fn lazy_umount_waits_for_the_last_user() {
    require!(fuse_available(), is_root(), have_tools(&["umount"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 1 << 20, 5);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let f = open_rw(e.path());
    sh!("umount", "-l", &mnt).ok();
    assert!(!e.is_mounted(), "detached from the namespace");
    thread::sleep(Duration::from_millis(500));
    assert!(
        e.is_running(),
        "coro-fuse must keep serving the open file after a lazy unmount\n{}",
        e.logs()
    );
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(
        &buf[..],
        &data[8192..8192 + 4096],
        "read through the detached mount"
    );
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    drop(f);
    let x = e.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "coro-fuse still runs 10 s after the last close\n{}",
            e.logs()
        )
    });
    assert_eq!(x.code(), Some(0), "{x}");
    assert_eq!(
        &read_all(&img)[..4096],
        &[1u8; 4096][..],
        "write through the detached mount"
    );
}

/// An idle export sleeps: it uses well under a second of CPU in three seconds.
#[test]
fn idle_export_does_not_spin() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 1 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let _ = read_all(e.path());
    let before = cpu_seconds(e.pid());
    thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(e.pid()) - before;
    assert!(
        used < 1.0,
        "idle coro-fuse used {used:.2} s of CPU in 3 s (busy loop?)"
    );
    e.stop_ok();
}

/// A backend I/O error reaches the client as an error (not zeroes, not a hang, not a crash)
/// and the export keeps serving. No device-mapper `error` target or error-injection option is
/// available, so the backend is itself a FUSE file (an inner coro-fuse export) whose server is
/// killed: every I/O on it then fails (ENOTCONN/ECONNABORTED).
#[test]
fn backend_errors_reach_the_client_and_the_export_survives() {
    require!(fuse_available(), have_tools(&["dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 4 << 20, 6);
    let inner_mnt = dir.path().join("inner");
    fs::write(&inner_mnt, b"").unwrap();
    let mut inner = Export::start(&img, &inner_mnt, NO_ARGS);
    let mnt = dir.path().join("outer");
    fs::write(&mnt, b"").unwrap();
    let mut outer = Export::start(&inner_mnt, &mnt, NO_ARGS);
    assert_same_bytes(
        &read_all(outer.path()),
        &data,
        "outer export before the failure",
    );

    inner.signal(libc::SIGKILL);
    let x = inner
        .wait_exit(Duration::from_secs(10))
        .expect("inner export killed");
    assert_eq!(x.status.code(), None, "killed by a signal");

    let ifp = format!("if={}", outer.path().display());
    for attempt in 0..2 {
        let out = sh!("dd", &ifp, "of=/dev/null", "bs=64k", "count=4", "skip=3");
        assert!(
            !out.success(),
            "attempt {attempt}: a read from a failed backend must fail: {out}"
        );
        assert!(
            out.stderr.contains("Input/output error")
                || out.stderr.contains("Transport endpoint is not connected")
                || out.stderr.contains("Software caused connection abort"),
            "attempt {attempt}: the backend's error should reach the client: {out}"
        );
    }
    let f = open_rw(outer.path());
    assert!(
        f.write_all_at(&[1u8; 4096], 0).is_err(),
        "a write to a failed backend must fail"
    );
    drop(f);
    assert!(
        outer.is_running(),
        "the export must survive backend errors\n{}",
        outer.logs()
    );
    assert_eq!(file_size(outer.path()), 4 << 20, "GETATTR still answered");
    let x = outer.stop();
    eprintln!("outer export after backend errors: {x}");
    assert!(
        matches!(x.code(), Some(0) | Some(3)),
        "SIGTERM with a failed backend: exit 0, or 3 if the final flush failed: {x}"
    );
}

/// Clients killed in the middle of large reads and writes (the kernel sends INTERRUPT or
/// abandons the request) do not disturb the export: it keeps serving and stops cleanly.
#[test]
fn killed_clients_do_not_disturb_the_export() {
    require!(fuse_available(), have_tools(&["dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 256 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, NO_ARGS);
    let p = e.path().to_path_buf();
    for i in 0..6 {
        let mut c = tool("dd");
        if i % 2 == 0 {
            c.arg(format!("if={}", p.display())).arg("of=/dev/null");
        } else {
            c.arg("if=/dev/zero")
                .arg(format!("of={}", p.display()))
                .arg("conv=notrunc");
        }
        let mut child = c
            .arg("bs=4M")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        thread::sleep(Duration::from_millis(150));
        kill(child.id(), if i < 3 { libc::SIGINT } else { libc::SIGKILL });
        assert!(
            wait_timeout(&mut child, Duration::from_secs(10)).is_some(),
            "a killed dd did not go away\n{}",
            e.logs()
        );
    }
    assert!(e.is_running(), "the export died\n{}", e.logs());
    let f = open_rw(&p);
    f.write_all_at(&[7u8; 4096], 4096).unwrap();
    let mut buf = [0u8; 4096];
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(
        buf, [7u8; 4096],
        "the export still serves after killed clients"
    );
    drop(f);
    e.stop_ok();
}

/// A backend read error (injected by the blkdebug filter through the hidden `--inject-error`)
/// reaches the client as EIO; the rest of the image stays readable, writes still work, and once
/// the one-shot rule has fired the same read succeeds.
#[test]
fn injected_eio_reaches_the_client_and_the_export_keeps_serving() {
    require!(fuse_available(), have_tools(&["dd"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    let data = random_image(&img, 4 << 20, 9);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    // Reads touching [1 MiB, 1 MiB + 4 KiB) fail with EIO once; writes to [2 MiB, 3 MiB) always.
    let mut exp = Export::start(
        &img,
        &mnt,
        &[
            "--inject-error",
            "read:1048576-1052672:EIO:once",
            "--inject-error",
            "write:2097152-3145728:EIO",
        ],
    );
    let ifp = format!("if={}", exp.path().display());
    let bad = sh!(
        "dd",
        &ifp,
        "of=/dev/null",
        "bs=4k",
        "count=1",
        "skip=256",
        "iflag=direct"
    );
    assert!(
        !bad.success(),
        "the injected read error must fail the read: {bad}"
    );
    assert!(
        bad.stderr.contains("Input/output error"),
        "EIO expected: {bad}"
    );

    // Other ranges still read correctly, and the failed block reads fine once the rule is gone.
    let f = open_rw(exp.path());
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).expect("read elsewhere");
    assert_eq!(&buf[..], &data[..4096]);
    f.read_exact_at(&mut buf, 1 << 20)
        .expect("the one-shot rule fired already");
    assert_eq!(&buf[..], &data[1 << 20..(1 << 20) + 4096]);

    let err = f
        .write_all_at(&[7u8; 4096], 2 << 20)
        .expect_err("write error injected");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "write error: {err}");
    f.write_all_at(&[7u8; 4096], 0)
        .expect("writes elsewhere work");
    f.sync_all().expect("fsync");
    drop(f);
    assert!(
        exp.is_running(),
        "the export must survive backend errors\n{}",
        exp.logs()
    );
    let out = exp.stop();
    assert_eq!(
        out.code(),
        Some(0),
        "clean stop after backend errors: {out}"
    );
    let img_bytes = fs::read(&img).unwrap();
    assert_eq!(
        &img_bytes[..4096],
        &[7u8; 4096][..],
        "the good write reached the image"
    );
    assert_eq!(
        &img_bytes[2 << 20..(2 << 20) + 4096],
        &data[2 << 20..(2 << 20) + 4096],
        "the failed write did not"
    );
}
