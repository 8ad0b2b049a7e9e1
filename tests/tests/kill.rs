//! External kills lose nothing acknowledged: writer threads in the test do fsync-heavy writes
//! (small batches of 4 KiB blocks, each stamped with its block number and a generation, and
//! some hole punches / zero ranges, which make a generation of zeros; then fsync or fdatasync)
//! and record which generation of each block a completed fsync covered.
//! The daemon is SIGKILLed at a seeded random moment. Afterwards, for qcow2, `qemu-img check`
//! may find leaks (exit 3) but never corruption; every block holds the generation of its last
//! completed fsync or a later one that was written (never an older one, never garbage); and a
//! restarted export reads the same bytes as `qemu-img convert`.
//!
//! Raw and qcow2 × both engines, alternating 1 and 2 queue threads, `--cache writeback` and
//! `none`, 4 KiB and 64 KiB clusters, and (every third round) a growable export that starts at
//! 1 MiB, over the rounds; every fourth round overwrites blocks written before (qcow2: shared
//! with an internal snapshot, so every write copies on write, and the snapshot must still hold
//! the old blocks afterwards). `CORO_FUSE_KILL_ROUNDS=N` runs N rounds per
//! test (default 4); `CORO_FUSE_KILL_SEED=S` changes the seeds (a failure prints the command
//! line that replays it; test.sh's re-runs with `CORO_FUSE_THREADS`/`CORO_FUSE_ENGINE`/
//! `CORO_FUSE_AIO` get other seeds).
//!
//! A SIGKILL, unlike a power cut, does not lose what the daemon handed to the kernel: this
//! finds writes acknowledged before they reached the image file, metadata (qcow2 L2 tables,
//! refcounts, the header) kept only in the daemon's memory past an fsync, crash windows that
//! leave a corrupt image, and images a restart cannot open.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tests::*;

const BLOCK: u64 = 4096;
const MIB: u64 = 1024 * 1024;
/// Blocks in the image (4 MiB).
const BLOCKS: u64 = 1024;
/// Writer threads; writer `t` owns a contiguous range of blocks, so each block has one writer.
const WRITERS: u64 = 3;
/// At most this many blocks per write (64 KiB: a whole 64 KiB cluster, or parts of two).
const MAX_RUN: u64 = 16;
const MAGIC: u64 = 0x4b49_4c4c_5445_5354; // "KILLTEST"

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
}

/// The content of generation `generation` (≥ 1) of block `block` in a round with seed `seed`.
fn stamp(seed: u64, block: u64, generation: u64) -> Vec<u8> {
    let mut b = random_bytes(
        seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(32),
        BLOCK as usize,
    );
    for (i, v) in [MAGIC, block, generation, seed].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Which generation a block holds: 0 for zeros (never written), `None` for anything that is
/// not a stamp of this block.
fn generation_in(seed: u64, block: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let generation = word(2);
    (word(0) == MAGIC
        && word(1) == block
        && word(3) == seed
        && generation > 0
        && b == stamp(seed, block, generation).as_slice())
    .then_some(generation)
}

/// What one writer did to its blocks (indexed from its first block).
struct Ledger {
    first: u64,
    /// The generation each block had when an fsync after its write completed (0: none).
    durable: Vec<u64>,
    /// The newest generation written (or being written) to each block.
    submitted: Vec<u64>,
    /// The generations of each block that were zeroings (hole punch or zero range), not writes.
    zeroed: Vec<Vec<u64>>,
    fsyncs: u64,
    /// Why it stopped (the daemon's death: an error on write or fsync).
    end: String,
}

/// What a writer does: blocks `[first, first + n)`; `growing`: from the start of its range
/// upwards, a few more blocks after each fsync (so a growable export grows all the time).
struct Job {
    seed: u64,
    first: u64,
    n: u64,
    growing: bool,
    /// The generation every block already has (fsynced) when the writer starts.
    start: u64,
}

/// Writes batches of stamped block runs, fsync after each batch, until `stop` or an error.
fn writer(path: &Path, job: Job, stop: &AtomicBool, fsyncs: &AtomicU64) -> Ledger {
    let Job {
        seed,
        first,
        n,
        growing,
        start,
    } = job;
    let mut l = Ledger {
        first,
        durable: vec![start; n as usize],
        submitted: vec![start; n as usize],
        zeroed: vec![Vec::new(); n as usize],
        fsyncs: 0,
        end: String::new(),
    };
    let f = match fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            l.end = format!("open: {e}");
            return l;
        }
    };
    let mut rng = Prng::new(seed ^ first);
    let mut pending: Vec<(usize, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1 + rng.below(6) {
            let reach = if growing {
                (4 + 2 * l.fsyncs).min(n)
            } else {
                n
            };
            let at = rng.below(reach);
            let run = (1 + rng.below(MAX_RUN)).min(n - at);
            if rng.below(5) == 0 {
                // A zeroing: a new generation whose content is zeros.
                for i in at..at + run {
                    let g = l.submitted[i as usize] + 1;
                    l.submitted[i as usize] = g;
                    l.zeroed[i as usize].push(g);
                    pending.push((i as usize, g));
                }
                let mode = if rng.below(2) == 0 {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                let r = fallocate(
                    &f,
                    mode | libc::FALLOC_FL_KEEP_SIZE,
                    (first + at) * BLOCK,
                    run * BLOCK,
                );
                if let Err(e) = r {
                    l.end = format!("fallocate: {e}");
                    return l;
                }
                continue;
            }
            let mut buf = Vec::with_capacity((run * BLOCK) as usize);
            for i in at..at + run {
                let g = l.submitted[i as usize] + 1;
                l.submitted[i as usize] = g;
                buf.extend_from_slice(&stamp(seed, first + i, g));
                pending.push((i as usize, g));
            }
            if let Err(e) = f.write_all_at(&buf, (first + at) * BLOCK) {
                l.end = format!("write: {e}");
                return l;
            }
        }
        let r = if rng.below(2) == 0 {
            f.sync_all()
        } else {
            f.sync_data()
        };
        if let Err(e) = r {
            l.end = format!("fsync: {e}");
            return l;
        }
        for (i, g) in pending.drain(..) {
            l.durable[i] = l.durable[i].max(g);
        }
        l.fsyncs += 1;
        fsyncs.fetch_add(1, Ordering::Relaxed);
    }
    l.end = "stopped".into();
    l
}

/// Every block of `image` against the ledgers; the problems found.
fn verify(seed: u64, image: &[u8], ledgers: &[Ledger]) -> Vec<String> {
    let mut bad = Vec::new();
    for l in ledgers {
        for (i, (&durable, &submitted)) in l.durable.iter().zip(&l.submitted).enumerate() {
            let b = l.first + i as u64;
            let at = (b * BLOCK) as usize;
            let zeroed = &l.zeroed[i];
            let state = format!(
                "fsynced generation {durable}, last written {submitted}, zeroings {zeroed:?}"
            );
            match generation_in(seed, b, &image[at..at + BLOCK as usize]) {
                None => bad.push(format!(
                    "block {b}: neither zeros nor a stamp of this block ({state})"
                )),
                // Zeros: the initial content, or a zeroing not older than the fsynced state.
                Some(0) if durable == 0 || zeroed.iter().any(|&z| z >= durable) => {}
                Some(0) => bad.push(format!(
                    "block {b}: zeros, but a newer generation was fsynced ({state})"
                )),
                Some(g) if g < durable => bad.push(format!(
                    "block {b}: generation {g}, but a newer one was fsynced ({state})"
                )),
                Some(g) if g > submitted || zeroed.contains(&g) => bad.push(format!(
                    "block {b}: generation {g} was never written ({state})"
                )),
                Some(_) => {}
            }
        }
    }
    bad
}

/// Writes generation 1 of every block through an export of `img` and stops it cleanly.
fn prefill(img: &Path, mnt: &Path, args: &[&str], seed: u64) {
    let mut e = Export::start(img, mnt, args);
    let f = open_rw(e.path());
    for chunk in 0..BLOCKS / MAX_RUN {
        let mut buf = Vec::with_capacity((MAX_RUN * BLOCK) as usize);
        for b in chunk * MAX_RUN..(chunk + 1) * MAX_RUN {
            buf.extend_from_slice(&stamp(seed, b, 1));
        }
        f.write_all_at(&buf, chunk * MAX_RUN * BLOCK)
            .expect("prefill write");
    }
    f.sync_all().expect("prefill fsync");
    drop(f);
    e.stop_ok();
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// The fixed seed, changed by the suite-wide `CORO_FUSE_THREADS`/`CORO_FUSE_ENGINE`/
/// `CORO_FUSE_AIO` so that test.sh's re-runs of the suite kill at other moments instead of
/// repeating these rounds.
fn default_seed() -> u64 {
    let mut s: u64 = 0x6b11_1000;
    for var in ["CORO_FUSE_THREADS", "CORO_FUSE_ENGINE", "CORO_FUSE_AIO"] {
        for b in std::env::var(var).unwrap_or_default().bytes() {
            s = s.rotate_left(7) ^ u64::from(b);
        }
    }
    s
}

fn kill_rounds(format: Format, engine: &str, combo: u64) {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let rounds = env_u64("CORO_FUSE_KILL_ROUNDS").unwrap_or(4);
    let base = env_u64("CORO_FUSE_KILL_SEED").unwrap_or_else(default_seed);
    let o_direct = supports_o_direct(dir.path());
    for round in 0..rounds {
        let seed = base.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (combo << 32) ^ round;
        let mut rng = Prng::new(seed);
        let threads = 1 + round % 2;
        let cache = if round % 2 == 1 && o_direct {
            "none"
        } else {
            "writeback"
        };
        let cluster = if (round / 2) % 2 == 0 { 65536 } else { 4096 };
        // Every third round starts small and grows: the writes past EOF grow the image (qcow2:
        // new L1 entries, with 4 KiB clusters a bigger L1 table) while the kill may come.
        let growable = round % 3 == 2;
        let initial = if growable { MIB } else { BLOCKS * BLOCK };
        // Every fourth round (if not growable) first writes generation 1 of every block and,
        // on qcow2, takes an internal snapshot: the writes then overwrite (raw) or copy shared
        // clusters on write (qcow2: new clusters, refcount changes, COPIED flags).
        let prefilled = round % 4 == 3 && !growable;
        let kill_after_ms = 20 + rng.below(400);
        let img = dir.path().join(match format {
            Format::Raw => format!("k{round}.img"),
            Format::Qcow2 => format!("k{round}.qcow2"),
        });
        let fmt = match format {
            Format::Raw => {
                sparse_image(&img, initial);
                "raw"
            }
            Format::Qcow2 => {
                create_qcow2(&img, &format!("cluster_size={cluster}"), initial);
                "qcow2"
            }
        };
        let what =
            format!(
            "{format:?} --engine {engine} --threads {threads} --cache {cache}{}{}{}, round {round}, \
             seed {seed:#x}, SIGKILL {kill_after_ms} ms after the first fsyncs \
             (replay: CORO_FUSE_KILL_SEED={base} CORO_FUSE_KILL_ROUNDS={rounds} cargo test -p \
             tests --test kill {})",
            if format == Format::Qcow2 {
                format!(", cluster {cluster}")
            } else {
                String::new()
            },
            if growable { " --growable from 1 MiB" } else { "" },
            match (prefilled, format) {
                (false, _) => "",
                (true, Format::Raw) => " over generation 1 of every block",
                (true, Format::Qcow2) => " over generation 1 of every block in a snapshot",
            },
            test_name()
        );
        let threads_arg = threads.to_string();
        let mut args = vec![
            "-f",
            fmt,
            "--engine",
            engine,
            "--threads",
            &threads_arg,
            "--cache",
            cache,
        ];
        if growable {
            args.push("--growable");
        }
        let mnt = dir.path().join("mnt");
        fs::write(&mnt, b"").expect("mountpoint");
        if prefilled {
            prefill(&img, &mnt, &args, seed);
            if format == Format::Qcow2 {
                sh!("qemu-img", "snapshot", "-c", "before", &img).ok();
            }
        }
        let mut e = Export::start(&img, &mnt, &args);

        let stop = Arc::new(AtomicBool::new(false));
        let fsyncs = Arc::new(AtomicU64::new(0));
        let per = BLOCKS / WRITERS;
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (path, stop, fsyncs) = (e.path().to_owned(), stop.clone(), fsyncs.clone());
                let n = if t == WRITERS - 1 {
                    BLOCKS - t * per
                } else {
                    per
                };
                let job = Job {
                    seed,
                    first: t * per,
                    n,
                    growing: growable,
                    start: u64::from(prefilled),
                };
                thread::spawn(move || writer(&path, job, &stop, &fsyncs))
            })
            .collect();
        let started = wait_until(Duration::from_secs(20), || {
            fsyncs.load(Ordering::Relaxed) >= WRITERS
        });
        thread::sleep(Duration::from_millis(kill_after_ms));
        e.signal(libc::SIGKILL);
        let x = e.wait_exit(Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        assert!(x.is_some(), "{what}: coro-fuse did not die of SIGKILL");
        drop(e); // detaches the dead mount: blocked writers fail
        assert!(
            wait_image_unlocked(&img, Duration::from_secs(30)),
            "{what}: the image is still locked 30 s after the daemon died"
        );
        let ledgers: Vec<Ledger> = writers
            .into_iter()
            .map(|w| w.join().expect("a writer thread panicked"))
            .collect();
        assert!(started, "{what}: the writers completed no fsync in 20 s");
        let total: u64 = ledgers.iter().map(|l| l.fsyncs).sum();
        let ends: Vec<&str> = ledgers.iter().map(|l| l.end.as_str()).collect();

        let mut check_code = None;
        let image = match format {
            Format::Raw => read_all(&img),
            Format::Qcow2 => {
                let out = qemu_img_check(&img);
                assert!(
                    matches!(out.code(), Some(0) | Some(3)),
                    "{what}: qemu-img check after SIGKILL: exit {:?} (2 = corruption)\n{out}",
                    out.code()
                );
                check_code = out.code();
                let raw = dir.path().join("converted.raw");
                sh!("qemu-img", "convert", "-f", "qcow2", "-O", "raw", &img, &raw).ok();
                let v = read_all(&raw);
                fs::remove_file(&raw).expect("remove the converted image");
                v
            }
        };
        eprintln!(
            "{what}: {total} fsyncs before the kill; writers ended with {ends:?}; image {} \
             bytes{}",
            image.len(),
            check_code.map_or(String::new(), |c| format!(", qemu-img check exit {c}"))
        );
        assert!(
            image.len() as u64 >= initial,
            "{what}: the image shrank to {} bytes",
            image.len()
        );
        // Past the end (a growable export that had not grown that far) reads as zeros.
        let mut padded = image.clone();
        padded.resize(padded.len().max((BLOCKS * BLOCK) as usize), 0);
        let bad = verify(seed, &padded, &ledgers);
        assert!(
            bad.is_empty(),
            "{what}: {} blocks wrong after the kill, e.g.:\n  {}",
            bad.len(),
            bad.iter()
                .take(12)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );

        // The snapshot still holds generation 1 everywhere: copy on write never touched it.
        if prefilled && format == Format::Qcow2 {
            let raw = dir.path().join("snapshot.raw");
            sh!(
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "-l",
                "snapshot.name=before",
                &img,
                &raw
            )
            .ok();
            let snap = read_all(&raw);
            fs::remove_file(&raw).expect("remove the converted snapshot");
            for b in 0..BLOCKS {
                let at = (b * BLOCK) as usize;
                let g = generation_in(seed, b, &snap[at..at + BLOCK as usize]);
                assert_eq!(g, Some(1), "{what}: block {b} of the snapshot changed");
            }
        }

        // A restart opens the killed image and reads what qemu-img read.
        let mut e = Export::start(&img, &mnt, &args);
        assert_same_bytes(
            &read_all(e.path()),
            &image,
            &format!("{what}: the restarted export vs the image after the kill"),
        );
        e.stop_ok();
        if format == Format::Qcow2 {
            let out = qemu_img_check(&img);
            assert!(
                matches!(out.code(), Some(0) | Some(3)),
                "{what}: qemu-img check after the restart and a clean stop: {out}"
            );
        }
        fs::remove_file(&img).expect("remove the image");
    }
}

#[test]
fn sigkill_during_fsync_heavy_writes_raw_coroutine() {
    kill_rounds(Format::Raw, "coroutine", 1);
}

#[test]
fn sigkill_during_fsync_heavy_writes_raw_async() {
    kill_rounds(Format::Raw, "async", 2);
}

#[test]
fn sigkill_during_fsync_heavy_writes_qcow2_coroutine() {
    kill_rounds(Format::Qcow2, "coroutine", 3);
}

#[test]
fn sigkill_during_fsync_heavy_writes_qcow2_async() {
    kill_rounds(Format::Qcow2, "async", 4);
}
