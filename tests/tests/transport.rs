//! `--transport dev|uring|auto`: FUSE over io_uring (Linux 6.14+) serves through ring entries
//! on every kernel queue, with both engines and any number of queue threads; it stops cleanly
//! on SIGTERM (also under load) and on an external `umount`; and when the kernel or the event
//! loops cannot do it, the export says so and serves over `/dev/fuse`.
//!
//! The kernel offers the ring only while `/sys/module/fuse/parameters/enable_uring` is on:
//! these tests switch it on (root), and the one that needs it off switches it off and back
//! under a lock. Without the parameter (an older kernel) they are skipped loudly, and fail
//! under `CI=true`.

use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tests::*;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
const MIB: u64 = 1 << 20;

/// Tests that depend on the parameter's value hold this (the tests of one binary run in
/// parallel; other binaries run before or after).
static PARAM_LOCK: Mutex<()> = Mutex::new(());

/// Switches the kernel's FUSE-over-io_uring parameter on; `None` (after a SKIP, or a panic
/// under CI) when this kernel has none or we may not write it.
fn uring_enabled() -> Option<MutexGuard<'static, ()>> {
    let guard = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !std::path::Path::new(PARAM).exists() {
        let _ = std::process::Command::new("modprobe").arg("fuse").status();
    }
    match fs::write(PARAM, "1") {
        Ok(()) => Some(guard),
        Err(e) => {
            skip(&format!(
                "cannot switch on FUSE over io_uring ({PARAM}: {e}); needs Linux 6.14+ with \
                 CONFIG_FUSE_IO_URING, and root — the io_uring transport tests did not run"
            ));
            None
        }
    }
}

/// The mounted line, once printed (just after INIT, a moment after the mount appears).
fn mounted_line(e: &Export) -> String {
    wait_until(Duration::from_secs(15), || e.stdout().contains("exported"));
    e.stdout()
}

/// The requests that arrived in ring entries, from the daemon's exit log.
fn ring_served(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.split("requests that arrived in io_uring entries: ")
                .nth(1)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// fio with crc32c verification through the ring, for both engines and 1 and 2 queue threads:
/// the mounted line names io_uring, the requests arrive in ring entries (the exit log counts
/// them), SIGTERM stops the export cleanly (exit 0, unmounted), and `qemu-img compare` of a
/// copy read through a second export equals the image.
#[test]
fn uring_serves_verified_io_with_both_engines() {
    require!(fuse_available(), have_tools(&["fio"]));
    let Some(_param) = uring_enabled() else {
        return;
    };
    for engine in ["coroutine", "async"] {
        for threads in ["1", "2"] {
            let dir = workdir();
            let img = dir.path().join("t.img");
            sparse_image(&img, 64 * MIB);
            let mnt = dir.path().join("mnt");
            fs::write(&mnt, b"").unwrap();
            let args = [
                "--transport",
                "uring",
                "--engine",
                engine,
                "--threads",
                threads,
            ];
            let mut e = Export::start(&img, &mnt, &args);
            mounted_line(&e);
            assert!(
                e.stdout().contains("via io_uring"),
                "the mounted line should name io_uring\n{}",
                e.logs()
            );
            fio_randwrite_verify(dir.path(), &e, 16 * MIB);
            let got = read_all(e.path());
            let x = e.stop_ok();
            let n = ring_served(&x.stderr);
            assert!(
                n > 1000,
                "{engine}/{threads}: only {n} requests came through the ring\n{x}"
            );
            assert_same_bytes(&got, &read_all(&img), "the export against the image");
            assert!(
                !x.stderr.contains("still registered"),
                "entries outlived the unmount\n{x}"
            );
        }
    }
}

/// An external `umount` ends a ring export: the kernel ends the entries' commands, the daemon
/// exits 0 on its own, and leaves no mount.
#[test]
fn external_umount_ends_a_uring_export() {
    require!(fuse_available());
    let Some(_param) = uring_enabled() else {
        return;
    };
    for engine in ["coroutine", "async"] {
        let dir = workdir();
        let img = dir.path().join("t.img");
        let model = random_image(&img, 4 * MIB as usize, 9);
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").unwrap();
        let mut e = Export::start(&img, &mnt, &["--transport", "uring", "--engine", engine]);
        assert_same_bytes(&read_all(e.path()), &model, "read through the ring");
        sh!("umount", &mnt).ok();
        let x = e
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{engine}: no exit after an external umount\n{}", e.logs()));
        assert_eq!(x.code(), Some(0), "{x}");
        assert_eq!(fuse_mounts_at(&mnt), 0);
        assert!(ring_served(&x.stderr) > 0, "{x}");
    }
}

/// SIGTERM while 8 writers keep the ring busy: the daemon drains, flushes, unmounts and exits
/// 0 within the stop timeout (no entry left waiting, no hang); the writers see their last
/// requests fail rather than hang; every write acknowledged with fsync before the stop is in
/// the image.
#[test]
fn sigterm_under_load_stops_a_uring_export() {
    require!(fuse_available());
    let Some(_param) = uring_enabled() else {
        return;
    };
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 64 * MIB);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(&img, &mnt, &["--transport", "uring", "--threads", "2"]);
    let path = e.path().to_path_buf();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let p = path.clone();
            thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let Ok(f) = fs::OpenOptions::new().write(true).open(&p) else {
                    return (Vec::new(), None);
                };
                let mut synced = Vec::new();
                for i in 0..10_000u64 {
                    let block = w * 1000 + i % 1000;
                    let data = random_bytes(block * 7 + i, 4096);
                    if f.write_all_at(&data, block * 4096).is_err() || f.sync_data().is_err() {
                        // Done but not acknowledged is allowed to be there too.
                        return (synced, Some((block, data)));
                    }
                    synced.push((block, data));
                }
                (synced, None)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(700));
    let start = Instant::now();
    let x = e.stop_ok();
    eprintln!("stopped under load in {:?}", start.elapsed());
    let image = read_all(&img);
    for w in writers {
        // The last acknowledged write of each block is there — or the one that was in flight
        // when the export stopped, if it reached the image without its reply reaching us.
        let (synced, unacked) = w.join().expect("writer");
        let mut last = std::collections::HashMap::new();
        for (block, data) in synced {
            last.insert(block, data);
        }
        for (block, data) in last {
            let at = (block * 4096) as usize;
            let got = &image[at..at + 4096];
            if unacked
                .as_ref()
                .is_some_and(|(b, d): &(u64, Vec<u8>)| *b == block && got == d.as_slice())
            {
                continue;
            }
            assert_same_bytes(got, &data, &format!("block {block} after the stop"));
        }
    }
    assert!(ring_served(&x.stderr) > 0, "{x}");
}

/// The fallbacks, each with a clear message and a working export over `/dev/fuse`: the kernel
/// parameter off (`uring` warns, `auto` notes it), event loops without io_uring (the hidden
/// `--inject-no-io-uring`), and the kernel refusing REGISTER after granting the ring in INIT
/// (payload buffers below its minimum, the hidden `--inject-uring-payload`). With the
/// parameter on, `auto` takes the ring.
#[test]
fn uring_falls_back_to_dev_fuse_with_a_message() {
    require!(fuse_available());
    let Some(_param) = uring_enabled() else {
        return;
    };
    let dir = workdir();
    let img = dir.path().join("t.img");
    let model = random_image(&img, MIB as usize, 4);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();

    let check = |args: &[&str], via: &str, log: Option<&str>| {
        let mut e = Export::start(&img, &mnt, args);
        assert_same_bytes(&read_all(e.path()), &model, &format!("{args:?}"));
        let line = mounted_line(&e);
        let x = e.stop_ok();
        assert!(
            line.contains(&format!("via {via}")),
            "{args:?}: {line}\n{x}"
        );
        if let Some(l) = log {
            assert!(x.stderr.contains(l), "{args:?}: no '{l}' in the log\n{x}");
        }
        x
    };
    check(&["--transport", "auto"], "io_uring", None);
    // The kernel refuses REGISTER (a payload buffer below its minimum): it drops the ring for
    // the whole connection and the same export serves over /dev/fuse; said once.
    let x = check(
        &["--transport", "uring", "--inject-uring-payload", "4096"],
        "io_uring",
        Some("the kernel serves this connection over /dev/fuse"),
    );
    assert_eq!(
        x.stderr.matches("serves this connection over").count(),
        1,
        "{x}"
    );
    assert_eq!(ring_served(&x.stderr), 0, "{x}");
    let x = check(
        // (--aio auto: the suite's --aio io_uring would rightly refuse to start without it)
        &[
            "--transport",
            "uring",
            "--inject-no-io-uring",
            "--aio",
            "auto",
        ],
        "/dev/fuse",
        Some("serving over /dev/fuse"),
    );
    assert!(x.stderr.contains("WARN"), "{x}");

    fs::write(PARAM, "0").expect("switch the parameter off");
    let restore = scopeguard(|| {
        let _ = fs::write(PARAM, "1");
    });
    let x = check(
        &["--transport", "uring"],
        "/dev/fuse",
        Some("the kernel has it switched off"),
    );
    assert!(x.stderr.contains("WARN"), "{x}");
    let x = check(
        &["--transport", "auto"],
        "/dev/fuse",
        Some("--transport auto: the kernel has it switched off"),
    );
    assert!(!x.stderr.contains("WARN"), "auto falls back quietly\n{x}");
    check(&["--transport", "dev"], "/dev/fuse", None);
    drop(restore);
}

/// Runs `f` when dropped (restores the kernel parameter even if an assertion fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The CPUs a thread may run on, from `/proc/PID/task/TID/status` (`Cpus_allowed_list`).
fn threads_and_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads") {
        let dir = t.expect("a thread").path();
        let (Ok(comm), Ok(status)) = (
            fs::read_to_string(dir.join("comm")),
            fs::read_to_string(dir.join("status")),
        ) else {
            continue; // a thread that just ended
        };
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        out.push((comm.trim().to_owned(), cpus));
    }
    out
}

/// `--uring-pin` (on by default): with as many queue threads as kernel queues, each queue
/// thread runs on its queue's CPU only — every CPU has its thread — while the thread-pool
/// workers (started later by those pinned threads) may run on every CPU; `--uring-pin off`
/// pins nothing. Read from `/proc`, after a write and an fsync through the ring (the fsync
/// runs on a pool worker with `--aio threads`).
#[test]
fn uring_pins_each_queue_thread_to_its_cpu_and_no_worker() {
    require!(fuse_available());
    let Some(_param) = uring_enabled() else {
        return;
    };
    let possible = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let mine = fs::read_to_string("/proc/self/status").unwrap();
    let mine = mine
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    if possible.trim() != mine {
        // A cpuset or offline CPUs: the pins of CPUs we may not use fail (the daemon logs it).
        loud(&format!(
            "SKIP-PART: this process may use CPUs {mine}, the kernel has queues for {}; \
             the pinning test needs them equal",
            possible.trim()
        ));
        return;
    }
    let cpus: usize = possible
        .trim()
        .rsplit(['-', ','])
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap()
        + 1;
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 16 * MIB);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    for pin in ["on", "off"] {
        let threads = cpus.to_string();
        let args = [
            "--transport",
            "uring",
            "--threads",
            &threads,
            "--aio",
            "threads",
            "--uring-pin",
            pin,
        ];
        let mut e = Export::start(&img, &mnt, &args);
        assert!(mounted_line(&e).contains("via io_uring"), "{}", e.logs());
        sh!(
            "dd",
            "if=/dev/urandom",
            format!("of={}", mnt.display()),
            "bs=64k",
            "count=16",
            "conv=fsync,notrunc"
        )
        .ok();
        let seen = threads_and_cpus(e.pid());
        let queue = |c: &str| c == "coro-fuse" || c.starts_with("queue-");
        let mut pinned: Vec<&str> = seen
            .iter()
            .filter(|(c, _)| queue(c))
            .map(|(_, cpus)| cpus.as_str())
            .collect();
        pinned.sort_unstable();
        let workers: Vec<&(String, String)> = seen
            .iter()
            .filter(|(c, _)| c.starts_with("worker"))
            .collect();
        assert!(
            !workers.is_empty(),
            "no pool worker started: {seen:?}\n{}",
            e.logs()
        );
        for (name, c) in &workers {
            assert_eq!(
                c, &mine,
                "{pin}: pool worker {name} runs on CPUs {c}: {seen:?}"
            );
        }
        if pin == "on" {
            let want: Vec<String> = (0..cpus).map(|c| c.to_string()).collect();
            let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(
                pinned,
                want,
                "one queue thread per CPU: {seen:?}\n{}",
                e.logs()
            );
        } else {
            assert!(
                pinned.iter().all(|c| *c == mine),
                "--uring-pin off: {seen:?}"
            );
        }
        e.stop_ok();
    }
}
