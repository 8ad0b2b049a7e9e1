//! The power-cut model and its checker, for `qcow2_crash.rs`.
//!
//! A workload runs through a [`Guest`]: a qcow2 driver over a [`BlklogwritesDriver`] over the
//! image file, so that every write and flush the driver sends to the file is logged (with
//! what each flush made durable), and every guest request is recorded with where in that log
//! it started and ended. [`check`] then rebuilds every file a power cut could leave:
//!
//! - at each flush boundary of the log (and before the first flush): the file as opened, plus
//!   every logged op the flush made durable, plus any subset of the ops logged after that
//!   (until the next flush completes) — a disk may persist unflushed writes in any order, or
//!   not at all;
//! - all subsets when there are few ops after the flush, otherwise the important ones (none,
//!   all, each op alone, each prefix, all but each op) and a fixed-seed random sample;
//! - torn writes: per boundary, up to two multi-sector writes (all of them in a long run), each
//!   persisting a random part of its 512-byte sectors while every other op after the flush
//!   persisted (a disk writes sectors atomically, not requests).
//!
//! Ops are logged as they complete; one in flight at the power cut is one of the later
//! boundary's "after the flush" ops, so the subsets cover it.
//!
//! Each distinct file is checked: `qemu-img check` finds no corruption (exit 0, or 3 for leaks
//! only); our driver opens it read-only and every guest sector that no request after the last
//! completed guest flush touched reads back exactly as the model of the guest's writes says
//! (the size may be any size set since); `qemu-img convert` reads the same bytes as our driver
//! (in a sample of the states). Sectors written after the last guest flush may hold anything:
//! qcow2 does not order guest data before the L2 entry that links it (neither does QEMU), so a
//! power cut may show a new cluster's earlier host bytes. How often a state shows neither the old
//! nor a new value there is counted and printed, not failed.
//!
//! A state whose header still has the dirty bit (the repair scenario: a crash before the repair
//! finished) may be reported corrupt by `qemu-img check`: it is then opened writable by our
//! driver, which must repair it to an image that checks clean (or leaks only) and reads back.
//!
//! There is no QEMU counterpart: QEMU's iotests replay `blklogwrites` logs only with the
//! outside `dm-log-writes` tools, and none for qcow2.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use block::qcow2::ChainOptions;
use block::{
    open_image, BackendOptions, BlklogwritesDriver, BlockBackend, FileDriver, FileOptions,
    LoggedOp, OpenOptions, Qcow2Driver,
};

use crate::common::{co, Lcg};

const SECTOR: u64 = 512;

/// A guest request, as the model needs it.
#[derive(Clone, Debug)]
pub enum GuestKind {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    /// Discard of whole clusters only (a partial one is left alone by qcow2): reads as zeros.
    Discard {
        offset: u64,
        len: u64,
    },
    Truncate {
        size: u64,
    },
    Flush,
}

/// A completed guest request and the log positions around it.
#[derive(Clone, Debug)]
pub struct GuestOp {
    pub kind: GuestKind,
    /// Log length when it was issued.
    pub start: usize,
    /// Log length when it completed.
    pub end: usize,
}

/// The driver under test with its write log, and the guest requests sent to it.
pub struct Guest {
    pub blk: Arc<BlockBackend>,
    pub log: Arc<BlklogwritesDriver>,
    pub ops: Vec<GuestOp>,
    /// The file as it was before the driver opened it.
    pub initial: Vec<u8>,
}

impl Guest {
    /// Opens `path` (qcow2, its backing chain, read-write) over a write log. Everything the
    /// open itself writes (a repair, the autoclear bits) is logged too.
    pub fn open(path: &Path, opts: &ChainOptions) -> Guest {
        let initial = std::fs::read(path).expect("read the image before opening it");
        let file = FileDriver::open(path, &FileOptions::default()).expect("open the file");
        let log = Arc::new(BlklogwritesDriver::new(Arc::new(file)));
        let q = Qcow2Driver::open_chain(log.clone(), path, opts).expect("open qcow2 over the log");
        let blk = BlockBackend::new(Arc::new(q), BackendOptions::default()).expect("backend");
        Guest {
            blk: Arc::new(blk),
            log,
            ops: Vec::new(),
            initial,
        }
    }

    fn run(&mut self, kind: GuestKind) {
        let start = self.log.len();
        let b = self.blk.clone();
        let k = kind.clone();
        co(move || match k {
            GuestKind::Write { offset, data } => b.co_pwrite(offset, &data),
            GuestKind::Zeroes { offset, len } => b.co_pwrite_zeroes(offset, len, true),
            GuestKind::Discard { offset, len } => b.co_pdiscard(offset, len),
            GuestKind::Truncate { size } => b.co_truncate(size),
            GuestKind::Flush => b.co_flush(),
        })
        .unwrap_or_else(|e| panic!("guest request {kind:?}: {e}"));
        let end = self.log.len();
        self.ops.push(GuestOp { kind, start, end });
    }

    /// Writes that do not overlap, all in flight at once (coroutines on two iothreads): each
    /// is recorded as issued before the first and completed after the last.
    pub fn write_concurrently(&mut self, writes: Vec<(u64, Vec<u8>)>) {
        let start = self.log.len();
        let iothreads: Vec<runtime::IoThread> = (0..2)
            .map(|t| runtime::IoThread::spawn(&format!("crash-w{t}")).expect("iothread"))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, (offset, data)) in writes.iter().cloned().enumerate() {
            let (b, tx) = (self.blk.clone(), tx.clone());
            iothreads[i % 2].spawn_co(move || {
                let res = b.co_pwrite(offset, &data);
                let _ = tx.send(res.map_err(|e| format!("write {offset}+{}: {e}", data.len())));
            });
        }
        drop(tx);
        for r in rx.iter() {
            r.expect("a concurrent write failed");
        }
        for t in iothreads {
            t.stop();
        }
        let end = self.log.len();
        for (offset, data) in writes {
            let kind = GuestKind::Write { offset, data };
            self.ops.push(GuestOp { kind, start, end });
        }
    }

    pub fn write(&mut self, offset: u64, data: Vec<u8>) {
        self.run(GuestKind::Write { offset, data });
    }

    pub fn zeroes(&mut self, offset: u64, len: u64) {
        self.run(GuestKind::Zeroes { offset, len });
    }

    pub fn discard(&mut self, offset: u64, len: u64) {
        self.run(GuestKind::Discard { offset, len });
    }

    pub fn truncate(&mut self, size: u64) {
        self.run(GuestKind::Truncate { size });
    }

    pub fn flush(&mut self) {
        self.run(GuestKind::Flush);
    }

    /// Closes the driver (a flush, the reserve returned, a flush), recorded as a guest flush.
    pub fn close(mut self) -> (Vec<LoggedOp>, Vec<GuestOp>, Vec<u8>) {
        let start = self.log.len();
        self.blk.close().expect("close");
        let end = self.log.len();
        self.ops.push(GuestOp {
            kind: GuestKind::Flush,
            start,
            end,
        });
        let log = self.log.log();
        (log, self.ops, self.initial)
    }

    /// Reads the whole guest image through the live driver.
    pub fn read_all(&self) -> Vec<u8> {
        let b = self.blk.clone();
        co(move || {
            let mut out = vec![0u8; b.size() as usize];
            b.co_pread(0, &mut out).map(|()| out)
        })
        .expect("read the live image")
    }
}

/// The guest-visible bytes after `op`, applied to `img`.
fn apply_guest(img: &mut Vec<u8>, op: &GuestKind) {
    match op {
        GuestKind::Write { offset, data } => {
            let o = *offset as usize;
            img[o..o + data.len()].copy_from_slice(data);
        }
        GuestKind::Zeroes { offset, len } | GuestKind::Discard { offset, len } => {
            img[*offset as usize..(*offset + *len) as usize].fill(0);
        }
        GuestKind::Truncate { size } => img.resize(*size as usize, 0),
        GuestKind::Flush => {}
    }
}

/// The model of the guest image after every request: `base` (what the guest saw at open)
/// with all of `ops` applied. The tests compare it with the live driver's reads too.
pub fn model(base: &[u8], ops: &[GuestOp]) -> Vec<u8> {
    let mut img = base.to_vec();
    for op in ops {
        apply_guest(&mut img, &op.kind);
    }
    img
}

/// Applies a logged file op (or, with `torn`, only the sectors it selects) to a file image.
fn apply_file(file: &mut Vec<u8>, op: &LoggedOp, torn: Option<&[bool]>) {
    let grow = |file: &mut Vec<u8>, end: u64| {
        if file.len() < end as usize {
            file.resize(end as usize, 0);
        }
    };
    match op {
        LoggedOp::Write { offset, data } => {
            grow(file, offset + data.len() as u64);
            let o = *offset as usize;
            match torn {
                None => file[o..o + data.len()].copy_from_slice(data),
                Some(keep) => {
                    for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
                        if keep[i] {
                            let at = o + i * SECTOR as usize;
                            file[at..at + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
            }
        }
        LoggedOp::WriteZeroes { offset, len } => {
            grow(file, offset + len);
            file[*offset as usize..(offset + len) as usize].fill(0);
        }
        LoggedOp::Discard { offset, len } => {
            let end = ((offset + len) as usize).min(file.len());
            if (*offset as usize) < end {
                file[*offset as usize..end].fill(0);
            }
        }
        LoggedOp::Truncate { size } => file.resize(*size as usize, 0),
        LoggedOp::Flush { .. } => {}
    }
}

/// One crash state of a window: which of its candidate ops persisted, and maybe one torn.
#[derive(Clone, Debug)]
struct StateSpec {
    /// Indices into the window's candidates, ascending.
    subset: Vec<usize>,
    /// A candidate (in `subset`) that persisted only partly: which of its sectors did.
    torn: Option<(usize, Vec<bool>)>,
}

/// How many states to try per flush boundary: `CORO_FUSE_CRASH_SAMPLES` (default 24; 256 is a
/// long run). Windows with at most log2(samples)+1 ops (at least 4, at most 10) get every
/// subset.
fn samples() -> usize {
    std::env::var("CORO_FUSE_CRASH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
        .max(4)
}

/// The subsets of `n` candidate ops to try.
fn subsets(n: usize, samples: usize, rng: &mut Lcg) -> Vec<Vec<usize>> {
    let exhaustive = ((samples as f64).log2() as usize + 1).clamp(4, 10);
    if n <= exhaustive {
        return (0u32..1 << n)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect();
    }
    let mut out: Vec<Vec<usize>> = vec![Vec::new(), (0..n).collect()];
    for i in 0..n {
        out.push(vec![i]);
        out.push((0..i).collect());
        out.push((0..n).filter(|&j| j != i).collect());
    }
    for _ in 0..samples {
        out.push((0..n).filter(|_| rng.below(2) == 1).collect());
    }
    out
}

/// What the checker did, per scenario.
#[derive(Debug, Default)]
pub struct Stats {
    pub windows: usize,
    pub states: usize,
    pub distinct: usize,
    pub torn: usize,
    pub converted: usize,
    pub repaired: usize,
    /// States where a sector written after the last guest flush read neither the value before
    /// it nor one written since (allowed; see the module doc).
    pub neither_old_nor_new: usize,
}

/// Everything [`check`] needs about one workload.
pub struct Scenario<'a> {
    pub name: &'a str,
    /// Where state files are written: the image's directory (relative backing names work).
    pub dir: &'a Path,
    /// The guest image as the workload started (backing data, zeros, an earlier write).
    pub base: Vec<u8>,
    pub initial: Vec<u8>,
    pub log: Vec<LoggedOp>,
    pub guest: Vec<GuestOp>,
    /// States still marked dirty may fail `qemu-img check`: repair them and check again.
    pub dirty_ok: bool,
}

/// What must read back in one window, and what may differ.
struct Expect {
    /// The guest image as of the last completed guest flush.
    required: Vec<u8>,
    /// The sizes the image may have.
    sizes: Vec<u64>,
    /// Per sector of `required`: touched by a request after that flush.
    touched: Vec<bool>,
    /// The guest requests since that flush (for the old-or-new count).
    since: Vec<GuestKind>,
}

impl Expect {
    fn new(base: &[u8], guest: &[GuestOp], window_end: usize) -> Expect {
        // The last guest flush that completed before the window's closing flush did.
        let last = guest
            .iter()
            .rposition(|g| matches!(g.kind, GuestKind::Flush) && g.end <= window_end);
        let (req_ops, rest) = match last {
            Some(i) => guest.split_at(i + 1),
            None => guest.split_at(0),
        };
        let required = model(base, req_ops);
        let since: Vec<GuestKind> = rest
            .iter()
            .filter(|g| g.start <= window_end)
            .map(|g| g.kind.clone())
            .collect();
        let mut touched = vec![false; (required.len() as u64).div_ceil(SECTOR) as usize];
        let mut sizes = vec![required.len() as u64];
        let mut size = required.len() as u64;
        let sectors = touched.len() as u64;
        let mut mark = |a: u64, b: u64| {
            for s in (a / SECTOR).min(sectors)..b.div_ceil(SECTOR).min(sectors) {
                if let Some(t) = touched.get_mut(s as usize) {
                    *t = true;
                }
            }
        };
        for k in &since {
            match k {
                GuestKind::Write { offset, data } => mark(*offset, offset + data.len() as u64),
                GuestKind::Zeroes { offset, len } | GuestKind::Discard { offset, len } => {
                    mark(*offset, offset + len)
                }
                GuestKind::Truncate { size: new } => {
                    mark(size.min(*new), u64::MAX / 2);
                    size = *new;
                    sizes.push(*new);
                }
                GuestKind::Flush => {}
            }
        }
        Expect {
            required,
            sizes,
            touched,
            since,
        }
    }

    /// Checks what our driver read from a state; returns an error message, and whether some
    /// touched sector read neither old nor new.
    fn verify(&self, got: &[u8]) -> Result<bool, String> {
        if !self.sizes.contains(&(got.len() as u64)) {
            return Err(format!(
                "size {} is none of the sizes the guest set: {:?}",
                got.len(),
                self.sizes
            ));
        }
        let n = got.len().min(self.required.len());
        let mut neither = false;
        for (s, &touched) in self.touched.iter().enumerate() {
            let a = s * SECTOR as usize;
            if a >= n {
                break;
            }
            let b = (a + SECTOR as usize).min(n);
            if got[a..b] == self.required[a..b] {
                continue;
            }
            if !touched {
                return Err(format!(
                    "guest sector {s} (byte {a}), flushed and not written since, reads wrong"
                ));
            }
            neither |= !self.is_a_new_value(a, &got[a..b]);
        }
        Ok(neither)
    }

    /// Whether `bytes` at guest offset `a` (one sector or less) are a value the requests since
    /// the flush could have left: the flushed bytes with one of them applied, or with all of
    /// them up to one, in order.
    fn is_a_new_value(&self, a: usize, bytes: &[u8]) -> bool {
        let old = &self.required[a..a + bytes.len()];
        let mut running = old.to_vec();
        self.since.iter().any(|k| {
            let mut single = old.to_vec();
            apply_to_sector(&mut single, a as u64, k);
            apply_to_sector(&mut running, a as u64, k);
            single == bytes || running == bytes
        })
    }
}

/// Applies the part of guest request `k` that falls in `sector` (guest bytes from `at`).
fn apply_to_sector(sector: &mut [u8], at: u64, k: &GuestKind) {
    let end = at + sector.len() as u64;
    let mut fill = |from: u64, to: u64, src: Option<(&[u8], u64)>| {
        let (lo, hi) = (from.max(at), to.min(end));
        for p in lo..hi {
            sector[(p - at) as usize] = src.map_or(0, |(d, o)| d[(p - o) as usize]);
        }
    };
    match k {
        GuestKind::Write { offset, data } => {
            fill(*offset, offset + data.len() as u64, Some((data, *offset)))
        }
        GuestKind::Zeroes { offset, len } | GuestKind::Discard { offset, len } => {
            fill(*offset, offset + len, None)
        }
        GuestKind::Truncate { size } => fill(*size, u64::MAX, None),
        GuestKind::Flush => {}
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// `qemu-img check`: exit code and output.
fn qemu_img_check(path: &Path) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text.into_owned())
}

/// Exit 0 (clean) or 3 (leaks only), and no error line.
fn check_ok(code: Option<i32>, out: &str) -> bool {
    matches!(code, Some(0 | 3)) && !out.contains("ERROR")
}

/// Our driver's read-only view of a state.
fn read_ours(path: &Path) -> Result<Vec<u8>, String> {
    // No locks: the file of the last state may still be closing on a worker thread.
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..OpenOptions::default()
    };
    let blk = open_image(path, &opts).map_err(|e| format!("our read-only open: {e}"))?;
    let b = blk.clone();
    co(move || {
        let mut out = vec![0u8; b.size() as usize];
        b.co_pread(0, &mut out).map(|()| out)
    })
    .map_err(|e| format!("our read: {e}"))
}

/// `qemu-img convert -O raw` of a state.
fn read_qemu(path: &Path) -> Result<Vec<u8>, String> {
    let raw = path.with_extension("raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .expect("run qemu-img convert");
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bytes = std::fs::read(&raw).expect("read the converted image");
    std::fs::remove_file(&raw).expect("remove the converted image");
    Ok(bytes)
}

/// A writable open, retried while the image is still locked: the last reference to a file
/// just closed may be dropped by a thread-pool worker a moment after the request completed.
fn open_writable(path: &Path) -> block::Result<Arc<BlockBackend>> {
    let mut tries = 0;
    loop {
        match open_image(path, &OpenOptions::default()) {
            Err(block::BlockError::Locked { .. }) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

fn is_dirty(file: &[u8]) -> bool {
    file.len() >= 80 && file[79] & 1 != 0
}

/// Checks one state file; returns what went wrong, if anything.
fn check_state(
    path: &Path,
    file: &[u8],
    expect: &Expect,
    dirty_ok: bool,
    convert: bool,
    stats: &Mutex<Stats>,
) -> Result<(), String> {
    std::fs::write(path, file).expect("write the state");
    let (code, out) = qemu_img_check(path);
    let dirty = is_dirty(file);
    if !(check_ok(code, &out) || dirty_ok && dirty) {
        return Err(format!("qemu-img check exit {code:?}:\n{out}"));
    }
    let got = read_ours(path)?;
    let neither = expect.verify(&got).map_err(|e| format!("ours: {e}"))?;
    if convert {
        let theirs = read_qemu(path)?;
        if theirs != got {
            return Err("qemu-img convert reads other bytes than our driver".into());
        }
    }
    let mut st = stats.lock().expect("stats");
    st.neither_old_nor_new += usize::from(neither);
    st.converted += usize::from(convert);
    drop(st);
    if dirty_ok && dirty {
        // A crash before the repair finished: the next writable open repairs it again.
        let blk = open_writable(path)
            .map_err(|e| format!("writable open (repair) of a dirty state: {e}"))?;
        blk.close()
            .map_err(|e| format!("close after repair: {e}"))?;
        drop(blk);
        let (code, out) = qemu_img_check(path);
        if !check_ok(code, &out) {
            return Err(format!(
                "after our repair: qemu-img check exit {code:?}:\n{out}"
            ));
        }
        let again = read_ours(path)?;
        if again != got {
            return Err("the repair changed the guest data".into());
        }
        stats.lock().expect("stats").repaired += 1;
    }
    Ok(())
}

/// Rebuilds and checks every crash state of the scenario; panics with the first failures.
pub fn check(s: &Scenario) -> Stats {
    let samples = samples();
    let long = samples >= 128;
    let stats = Mutex::new(Stats::default());
    let failures = Mutex::new(Vec::<String>::new());
    let mut seen = HashSet::new();
    let mut rng = Lcg(0xc4a5_0000 ^ s.name.len() as u64);
    // Window boundaries: (durable prefix, end) — before the first flush, then after each.
    let mut windows = Vec::new();
    let mut durable = 0;
    let flush_at: Vec<usize> = (0..s.log.len())
        .filter(|&i| matches!(s.log[i], LoggedOp::Flush { .. }))
        .collect();
    windows.push((0, flush_at.first().copied().unwrap_or(s.log.len())));
    for (j, &f) in flush_at.iter().enumerate() {
        if let LoggedOp::Flush { durable: d } = s.log[f] {
            durable = durable.max(d);
        }
        let end = flush_at.get(j + 1).copied().unwrap_or(s.log.len());
        windows.push((durable, end));
    }
    if std::env::var_os("CORO_FUSE_CRASH_DUMP").is_some() {
        for (i, op) in s.log.iter().enumerate() {
            eprintln!("{}: log {i}: {}", s.name, describe(op));
        }
        for g in &s.guest {
            eprintln!(
                "{}: guest {}..{}: {}",
                s.name,
                g.start,
                g.end,
                describe_guest(&g.kind)
            );
        }
    }
    let mut base = s.initial.clone();
    let mut applied = 0;
    let workers = 2;
    for (w, &(durable, end)) in windows.iter().enumerate() {
        while applied < durable {
            apply_file(&mut base, &s.log[applied], None);
            applied += 1;
        }
        let cands: Vec<usize> = (durable..end)
            .filter(|&i| !matches!(s.log[i], LoggedOp::Flush { .. }))
            .collect();
        let mut specs: Vec<StateSpec> = subsets(cands.len(), samples, &mut rng)
            .into_iter()
            .map(|subset| StateSpec { subset, torn: None })
            .collect();
        // Torn writes: all candidates persisted but one multi-sector write only partly.
        let tearable: Vec<usize> = (0..cands.len())
            .filter(|&i| matches!(&s.log[cands[i]], LoggedOp::Write { data, .. } if data.len() > SECTOR as usize))
            .collect();
        let max_torn = if long { tearable.len() } else { 2 };
        for &i in tearable.iter().take(max_torn) {
            let LoggedOp::Write { data, .. } = &s.log[cands[i]] else {
                unreachable!()
            };
            let n = data.len().div_ceil(SECTOR as usize);
            let mut keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
            keep[0] = !keep[n - 1]; // some sectors persisted, some not
            specs.push(StateSpec {
                subset: (0..cands.len()).collect(),
                torn: Some((i, keep)),
            });
        }
        let expect = Expect::new(&s.base, &s.guest, end);
        // Build the files, dropping duplicates.
        let mut files = Vec::new();
        for spec in &specs {
            let mut file = base.clone();
            for &i in &spec.subset {
                let torn = spec
                    .torn
                    .as_ref()
                    .filter(|(t, _)| *t == i)
                    .map(|(_, k)| &k[..]);
                apply_file(&mut file, &s.log[cands[i]], torn);
            }
            let mut st = stats.lock().expect("stats");
            st.states += 1;
            if seen.insert(hash_of(&file)) {
                st.distinct += 1;
                st.torn += usize::from(spec.torn.is_some());
                files.push((spec.clone(), file));
            }
        }
        stats.lock().expect("stats").windows += 1;
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..workers {
                let (files, next, expect, stats, failures, cands) =
                    (&files, &next, &expect, &stats, &failures, &cands);
                let path: PathBuf = s.dir.join(format!("crash-state-{t}.qcow2"));
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((spec, file)) = files.get(i) else { break };
                    let convert = long || i % 8 == 0;
                    if let Err(e) = check_state(&path, file, expect, s.dirty_ok, convert, stats)
                    {
                        let mut f = failures.lock().expect("failures");
                        if f.len() < 5 {
                            let ops: Vec<String> =
                                spec.subset.iter().map(|&c| describe(&s.log[cands[c]])).collect();
                            let keep = Some(env!("CARGO_TARGET_TMPDIR")).map(|d| {
                                let p = Path::new(&d).join(format!("crash-fail-{}-{}.qcow2", s.name, f.len()));
                                std::fs::write(&p, file).expect("keep the failing state");
                                p
                            });
                            f.push(format!(
                                "window {w} (durable {durable} of {} log entries, closing at {end}): \
                                 persisted {ops:?}, torn {:?}: {e} (kept as {keep:?})",
                                s.log.len(),
                                spec.torn.as_ref().map(|(t, _)| describe(&s.log[cands[*t]])),
                            ));
                        } else {
                            f.push(String::new());
                        }
                    }
                });
            }
        });
    }
    let stats = stats.into_inner().expect("stats");
    eprintln!(
        "{}: {} log entries, {} flush boundaries, {} crash states ({} distinct, {} torn), \
         {} also read by qemu-img convert, {} repaired; {} showed a sector written after the \
         last flush as neither old nor new (allowed)",
        s.name,
        s.log.len(),
        stats.windows,
        stats.states,
        stats.distinct,
        stats.torn,
        stats.converted,
        stats.repaired,
        stats.neither_old_nor_new
    );
    let failures = failures.into_inner().expect("failures");
    assert!(
        failures.is_empty(),
        "{}: {} of {} crash states fail; the first:\n{}",
        s.name,
        failures.len(),
        stats.distinct,
        failures
            .iter()
            .filter(|f| !f.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    stats
}

/// A short description of a logged op for failure messages.
fn describe(op: &LoggedOp) -> String {
    match op {
        LoggedOp::Write { offset, data } => format!("write {offset:#x}+{}", data.len()),
        LoggedOp::WriteZeroes { offset, len } => format!("zeroes {offset:#x}+{len}"),
        LoggedOp::Discard { offset, len } => format!("discard {offset:#x}+{len}"),
        LoggedOp::Truncate { size } => format!("truncate {size}"),
        LoggedOp::Flush { durable } => format!("flush ({durable})"),
    }
}

fn describe_guest(k: &GuestKind) -> String {
    match k {
        GuestKind::Write { offset, data } => format!("write {offset:#x}+{}", data.len()),
        GuestKind::Zeroes { offset, len } => format!("zeroes {offset:#x}+{len}"),
        GuestKind::Discard { offset, len } => format!("discard {offset:#x}+{len}"),
        GuestKind::Truncate { size } => format!("truncate {size}"),
        GuestKind::Flush => "flush".into(),
    }
}
