//! Bounded resources: a queue never has more than `--max-in-flight` requests in flight, however
//! many the clients send, and a request whose coroutine stack or buffer cannot be allocated is
//! answered ENOMEM while the export keeps serving (never an abort).
//!
//! These are the `/dev/fuse` transport's mechanics (its read handler pauses at the bound and
//! allocates per request), so the tests pin `--transport dev`; the io_uring transport's bound is
//! its entries, allocated once at INIT, tested in `transport.rs`.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::thread;

use tests::*;

const MIB: usize = 1024 * 1024;

/// The counters the daemon logs at exit: `peak in flight per queue (bound N): [a, b, …]`.
fn peak_per_queue(stderr: &str) -> (usize, Vec<usize>) {
    let line = stderr
        .lines()
        .find(|l| l.contains("peak in flight per queue"))
        .unwrap_or_else(|| panic!("no peak in-flight statistics in the log:\n{stderr}"));
    let bound = line
        .split("(bound ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bound in {line:?}"));
    let list = line.rsplit('[').next().unwrap_or("").trim_end_matches(']');
    let peaks = list
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    (bound, peaks)
}

/// 32 client threads write 1 MiB blocks (every write is a request, the export being direct
/// I/O) against `--max-in-flight 4` on two queues: no queue ever has more than 4 in flight,
/// the data is all there, and the daemon stops cleanly.
#[test]
fn a_flood_never_exceeds_the_bound_of_a_queue() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    const CLIENTS: usize = 32;
    const BLOCKS: usize = 8; // per client
    sparse_image(&img, (CLIENTS * BLOCKS * MIB) as u64);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(
        &img,
        &mnt,
        &[
            "--max-in-flight",
            "4",
            "--threads",
            "2",
            "--transport",
            "dev",
        ],
    );
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let p = e.path().to_path_buf();
            thread::spawn(move || {
                let f = open_rw(&p);
                for b in 0..BLOCKS {
                    let i = c * BLOCKS + b;
                    f.write_all_at(&random_bytes(i as u64, MIB), (i * MIB) as u64)
                        .unwrap_or_else(|err| panic!("write of block {i}: {err}"));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let got = read_all(e.path());
    for i in 0..CLIENTS * BLOCKS {
        let want = random_bytes(i as u64, MIB);
        assert_same_bytes(&got[i * MIB..(i + 1) * MIB], &want, &format!("block {i}"));
    }
    let x = e.stop_ok();
    let (bound, peaks) = peak_per_queue(&x.stderr);
    assert_eq!(bound, 4, "{x}");
    assert_eq!(peaks.len(), 2, "one peak per queue: {peaks:?}");
    assert!(
        peaks.iter().all(|&p| p <= 4),
        "a queue had more requests in flight than --max-in-flight 4: {peaks:?}"
    );
    eprintln!("peak in flight per queue: {peaks:?}");
    assert!(
        peaks.iter().any(|&p| p > 1),
        "32 clients never had two requests in flight at once: {peaks:?}"
    );
}

/// Runs 200 writes of 4 KiB (each a request) with `--inject-enomem RULE` and returns each
/// write's result, after checking that the export still serves and stops cleanly, that every
/// write that succeeded is in the image, and that the log says why the others failed.
fn writes_with_injected_enomem(rule: &str, engine: &str, why: &str) -> Vec<io::Result<()>> {
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 1 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let args = [
        "--inject-enomem",
        rule,
        "--engine",
        engine,
        "--threads",
        "1",
        "--transport",
        "dev",
    ];
    let mut e = Export::start(&img, &mnt, &args);
    let f = open_rw(e.path());
    let results: Vec<io::Result<()>> = (0..200u64)
        .map(|i| f.write_all_at(&random_bytes(i, 4096), i * 4096))
        .collect();
    // The export still serves: every write that succeeded reads back.
    for (i, r) in results.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        f.read_exact_at(&mut got, i as u64 * 4096)
            .unwrap_or_else(|err| panic!("read after the failures: {err}\n{}", e.logs()));
        if r.is_ok() {
            assert_same_bytes(&got, &random_bytes(i as u64, 4096), &format!("write {i}"));
        }
    }
    drop(f);
    let x = e.stop_ok();
    assert!(
        x.stderr.contains(why) && x.stderr.contains("replying ENOMEM to WRITE"),
        "the log should say which request got ENOMEM and why ({why}): {x}"
    );
    results
}

/// Checks the failures: some writes failed, each with ENOMEM; the last ones all succeeded.
fn assert_enomem_then_served(results: &[io::Result<()>], what: &str) {
    let failed: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].is_err())
        .collect();
    assert!(
        !failed.is_empty() && failed.len() <= 3,
        "{what}: expected 1 to 3 writes to fail, got {failed:?}"
    );
    for &i in &failed {
        let err = results[i].as_ref().unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOMEM),
            "{what}: write {i}: {err}"
        );
    }
    eprintln!("{what}: writes {failed:?} failed with ENOMEM");
    let last = failed[failed.len() - 1];
    assert!(
        last < results.len() - 100,
        "{what}: the failures should be early ({failed:?}), so later writes show the export kept serving"
    );
}

/// Creations 41–43 of coroutines fail as if no stack could be mapped: those requests get
/// ENOMEM, the following ones are served.
#[test]
fn a_coroutine_stack_that_cannot_be_mapped_fails_one_request() {
    require!(fuse_available());
    let results = writes_with_injected_enomem("stack:40:3", "coroutine", "no coroutine stack");
    assert_enomem_then_served(&results, "stack");
}

/// Payload buffers 41–43 cannot be had: the queue reads those requests into its reserve
/// buffer and answers ENOMEM; the following ones are served. Both engines share this path.
#[test]
fn a_request_buffer_that_cannot_be_had_fails_one_request() {
    require!(fuse_available());
    let engine = engine_under_test();
    let results =
        writes_with_injected_enomem("buffer:40:3", &engine, "no memory for a request buffer");
    assert_enomem_then_served(&results, "buffer");
}

/// fio with asynchronous O_DIRECT (background requests, which the kernel limits by the
/// `max_background` of threads × bound = 4 we announce) against `--max-in-flight 2`: verified
/// data, no queue over 2, a clean stop.
#[test]
fn fio_verify_through_a_bound_of_two() {
    require!(fuse_available(), have_tools(&["fio"]));
    let dir = workdir();
    let img = dir.path().join("t.img");
    sparse_image(&img, 64 << 20);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let mut e = Export::start(
        &img,
        &mnt,
        &[
            "--max-in-flight",
            "2",
            "--threads",
            "2",
            "--transport",
            "dev",
        ],
    );
    assert!(
        e.stderr().contains("max_background 4"),
        "max_background follows the bound: {}",
        e.logs()
    );
    fio_randwrite_verify(dir.path(), &e, 16 << 20);
    let x = e.stop_ok();
    let (bound, peaks) = peak_per_queue(&x.stderr);
    assert_eq!(bound, 2, "{x}");
    assert!(peaks.iter().all(|&p| p <= 2), "over the bound: {peaks:?}");
}

/// The daemon's own value of a `/proc/PID/status` field, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Real exhaustion, no injection: the running daemon's address space is capped (`prlimit`
/// RLIMIT_AS) a little above what it uses, and 32 clients write 1 MiB blocks, each needing a
/// 2 MiB payload buffer. The requests that find no memory get ENOMEM; nothing aborts; the writes
/// that succeeded are in the image; the daemon stops cleanly.
#[test]
fn an_address_space_limit_fails_requests_with_enomem_not_an_abort() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("t.img");
    const CLIENTS: usize = 32;
    const BLOCKS: usize = 4;
    sparse_image(&img, (CLIENTS * BLOCKS * MIB) as u64);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let args = [
        "--max-in-flight",
        "1024",
        "--threads",
        "1",
        "--transport",
        "dev",
    ];
    let mut e = Export::start(&img, &mnt, &args);
    let limit = (status_kib(e.pid(), "VmSize") + 24 * 1024) * 1024;
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit with a valid pid, a pointer to a live rlimit, and no old-value pointer.
    let r = unsafe {
        libc::prlimit(
            e.pid() as libc::pid_t,
            libc::RLIMIT_AS,
            &rlim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let p = e.path().to_path_buf();
            thread::spawn(move || {
                // The OPEN needs a request buffer too: under the limit it may get ENOMEM,
                // and then every write of this client counts as refused with it.
                let f = fs::OpenOptions::new().read(true).write(true).open(&p);
                (0..BLOCKS)
                    .map(|b| {
                        let i = c * BLOCKS + b;
                        let r = match &f {
                            Ok(f) => f.write_all_at(&random_bytes(i as u64, MIB), (i * MIB) as u64),
                            Err(e) => {
                                Err(io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0)))
                            }
                        };
                        (i, r.map_err(|e| e.raw_os_error()))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(usize, Result<(), Option<i32>>)> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    assert!(
        e.is_running(),
        "the daemon died under the limit\n{}",
        e.logs()
    );
    let x = e.stop_ok();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let ok = results.len() - failed.len();
    eprintln!("{ok} writes succeeded, {} got ENOMEM", failed.len());
    assert!(
        failed.iter().all(|(_, r)| *r == Err(Some(libc::ENOMEM))),
        "only ENOMEM may fail a write: {failed:?}"
    );
    assert!(!failed.is_empty(), "the limit should have bitten\n{x}");
    assert!(x.stderr.contains("replying ENOMEM"), "{x}");
    let image = read_all(&img);
    for (i, r) in &results {
        if r.is_ok() {
            let want = random_bytes(*i as u64, MIB);
            assert_same_bytes(&image[i * MIB..(i + 1) * MIB], &want, &format!("block {i}"));
        }
    }
}
