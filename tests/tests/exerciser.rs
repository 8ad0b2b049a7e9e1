//! A model-checked exerciser: random reads, writes, truncates, hole punches, zero ranges,
//! fallocate grows, `SEEK_DATA`/`SEEK_HOLE`, fsyncs and stats on a growable `--cache none`
//! export, each result checked against an in-memory model of the file. After a clean stop the
//! image (read by `qemu-img convert -O raw`) must equal the model, `qemu-img check` must be
//! clean (qcow2), and a restarted export must show the same size and bytes.
//!
//! The matrix: raw and qcow2 × `--threads 1` and `2` × `--engine coroutine` and `async`, one
//! test each, so every run covers both engines and both thread counts; plus two qcow2 overlays
//! over a raw backing file with data (shrinking into it and growing back must read zeros, the
//! backing file is never written). Some operations run as concurrent batches on adjacent
//! ranges, and every operation picks a plain or an O_DIRECT descriptor. Seeds are fixed;
//! `CORO_FUSE_EXERCISER_OPS=N` runs N operations per test (default 600) and
//! `CORO_FUSE_EXERCISER_SEED=S` replays seed S (a failure prints the command). When the
//! suite is re-run with `CORO_FUSE_THREADS`/`CORO_FUSE_ENGINE`/`CORO_FUSE_AIO` set (test.sh),
//! the seeds change with them, so a re-run explores new sequences instead of repeating the same ones.
//!
//! The size rules of the model are one function, [`size_rule`]: raw sizes are byte-granular;
//! qcow2 stores sectors, so any growth rounds the size up to a multiple of 512 and a truncate to
//! another size is EINVAL (as in QEMU). A qcow2 shrink is refused (EINVAL) while a cluster past
//! the new end may still hold data (see `block/src/qcow2/resize.rs`); the model tracks which
//! clusters may, conservatively, and expects a whole-cluster hole punch to free a cluster.
//! For raw, the image file's length must equal the model's size after every operation; QEMU
//! reads a raw file rounded up to 512 bytes, so `qemu-img convert` is compared with the model
//! padded with zeros to that.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The model refuses to grow the file past this (keeps every run small and fast).
const MAX_SIZE: u64 = 6 * MIB;
/// Operations per test unless `CORO_FUSE_EXERCISER_OPS` says otherwise.
const DEFAULT_OPS: u64 = 600;
/// Operations between two whole-file comparisons.
const FULL_CHECK_EVERY: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
}

/// A change of the export's size, as [`size_rule`] sees it.
#[derive(Clone, Copy, Debug)]
enum SizeChange {
    /// A write, `fallocate(0)` or `ZERO_RANGE` without `KEEP_SIZE` that ends at `end`, past EOF.
    Grow { end: u64 },
    /// An explicit truncate (`ftruncate`, SETATTR size).
    Truncate { to: u64 },
}

/// THE size rule of the model: the export's size after `change` from size `old`, or the errno
/// the request must fail with (then nothing changes).
///
/// - raw: byte-granular. Growth goes to exactly `end`; a truncate to any size works.
/// - qcow2 (stores its size in 512-byte sectors): growth goes to `end` rounded up to a multiple
///   of 512 (the data is kept, zeros follow); a truncate to a size that is not a multiple of
///   512 is EINVAL, as QEMU's `qcow2_co_truncate` refuses it.
///
/// Growth never shrinks. (Whether a qcow2 *shrink* is refused because of allocated clusters is
/// a separate question: [`Model::shrink_may_be_refused`].)
fn size_rule(format: Format, old: u64, change: SizeChange) -> Result<u64, i32> {
    const SECTOR: u64 = 512;
    match (format, change) {
        (Format::Raw, SizeChange::Grow { end }) => Ok(old.max(end)),
        (Format::Raw, SizeChange::Truncate { to }) => Ok(to),
        (Format::Qcow2, SizeChange::Grow { end }) => Ok(old.max(end.next_multiple_of(SECTOR))),
        (Format::Qcow2, SizeChange::Truncate { to }) if to % SECTOR != 0 => Err(libc::EINVAL),
        (Format::Qcow2, SizeChange::Truncate { to }) => Ok(to),
    }
}

/// What the file must hold.
struct Model {
    format: Format,
    /// The content; its length is the size.
    data: Vec<u8>,
    /// qcow2 cluster size (raw: 4 KiB, unused).
    cluster: u64,
    /// qcow2: clusters that may hold data (over-approximated: a write or a zeroing may allocate;
    /// only a whole-cluster hole punch or a shrink past it frees one).
    maybe_data: Vec<bool>,
    /// The length of the qcow2 image's backing file (0: none).
    backing_end: u64,
}

impl Model {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn clusters(&self, off: u64, end: u64) -> std::ops::Range<usize> {
        (off / self.cluster) as usize..end.div_ceil(self.cluster) as usize
    }

    fn mark_maybe_data(&mut self, off: u64, end: u64) {
        let r = self.clusters(off, end);
        if self.maybe_data.len() < r.end {
            self.maybe_data.resize(r.end, false);
        }
        self.maybe_data[r].fill(true);
    }

    /// A hole punch over `[off, end)`: whole clusters are freed, partial ones written.
    fn punch_clusters(&mut self, off: u64, end: u64) {
        let first_whole = off.div_ceil(self.cluster);
        let end_whole = end / self.cluster;
        if first_whole >= end_whole {
            self.mark_maybe_data(off, end);
            return;
        }
        self.mark_maybe_data(off, first_whole * self.cluster);
        self.mark_maybe_data(end_whole * self.cluster, end);
        for c in first_whole..end_whole {
            if let Some(b) = self.maybe_data.get_mut(c as usize) {
                *b = false;
            }
        }
    }

    /// qcow2: a shrink to `to` may be refused while a cluster wholly past it may hold data.
    fn shrink_may_be_refused(&self, to: u64) -> bool {
        self.format == Format::Qcow2
            && self
                .maybe_data
                .iter()
                .skip(to.div_ceil(self.cluster) as usize)
                .any(|&b| b)
    }

    /// Applies a size change that [`size_rule`] allowed: new bytes are zeros. Growing zeroes
    /// the old last cluster's tail and, over a backing file, the new range it covers (whole
    /// clusters become zero clusters, not data); a partial cluster may become data (qcow2 writes
    /// zeros into it).
    fn resize(&mut self, size: u64) {
        let old = self.size();
        if size > old {
            let cs = self.cluster;
            self.mark_maybe_data(old, old.next_multiple_of(cs).min(size));
            let b = self.backing_end;
            if old < b && b < size && !b.is_multiple_of(cs) {
                self.mark_maybe_data(b - b % cs, b);
            }
        }
        self.data.resize(size as usize, 0);
        let keep = size.div_ceil(self.cluster) as usize;
        if self.maybe_data.len() > keep {
            self.maybe_data.truncate(keep);
        }
    }

    fn zero(&mut self, off: u64, end: u64) {
        let end = end.min(self.size());
        if off < end {
            self.data[off as usize..end as usize].fill(0);
        }
    }

    fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        self.mark_maybe_data(off, off + buf.len() as u64);
    }

    /// True if `[off, end)` (clamped at EOF) is all zeros.
    fn zeros(&self, off: u64, end: u64) -> bool {
        let end = end.min(self.size());
        off >= end
            || self.data[off as usize..end as usize]
                .iter()
                .all(|&b| b == 0)
    }
}

/// One run: the open file, the model, the random source and the log of what was done.
struct Run {
    /// The exported file opened twice: plainly and with O_DIRECT (the export replies
    /// FOPEN_DIRECT_IO either way; O_DIRECT on the client takes another kernel path).
    files: [File; 2],
    /// Which of `files` the current operation uses.
    cur: usize,
    model: Model,
    rng: Prng,
    log: VecDeque<String>,
    done: usize,
    what: String,
    /// The image file, when it is raw: its length must follow the model after every operation.
    raw_image: Option<std::path::PathBuf>,
}

fn errno<T>(r: io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

impl Run {
    /// Fails the test with the seed, the operation count and the tail of the log.
    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let log: Vec<&str> = self.log.iter().map(String::as_str).collect();
        panic!(
            "{}: operation {}: {msg}\nlast operations (oldest first):\n  {}",
            self.what,
            self.done,
            log.join("\n  ")
        );
    }

    fn f(&self) -> &File {
        &self.files[self.cur]
    }

    fn note(&mut self, s: String) {
        if self.log.len() == 40 {
            self.log.pop_front();
        }
        let fd = if self.cur == 1 { " [O_DIRECT fd]" } else { "" };
        self.log.push_back(format!("#{} {s}{fd}", self.done));
    }

    /// An offset biased to the interesting places: around EOF, cluster and sector edges.
    fn pick_offset(&mut self) -> u64 {
        let size = self.model.size();
        let cs = self.model.cluster;
        let r = &mut self.rng;
        let off = match r.below(6) {
            0 => size.saturating_sub(r.below(3 * KIB)),
            1 => size + r.below(3 * KIB),
            2 => (r.below(size / cs + 1) * cs + r.below(7)).saturating_sub(3),
            3 => r.below(size / 512 + 1) * 512,
            _ => r.below(size + 64 * KIB),
        };
        off.min(MAX_SIZE - 1)
    }

    /// A length: tiny, around sector/page/cluster sizes, a few clusters, or large.
    fn pick_len(&mut self, off: u64) -> u64 {
        let cs = self.model.cluster;
        let r = &mut self.rng;
        let len = match r.below(4) {
            0 => 1 + r.below(4),
            1 => [511, 512, 513, 4095, 4096, 4097, cs - 1, cs, cs + 1][r.below(9) as usize],
            2 => 1 + r.below(3 * cs),
            _ => 1 + r.below(256 * KIB),
        };
        len.min(MAX_SIZE - off).max(1)
    }

    fn step(&mut self) {
        self.cur = self.rng.below(2) as usize;
        match self.rng.below(100) {
            0..=17 => self.op_write(),
            18..=31 => self.op_read(),
            32..=38 => self.op_truncate(),
            39..=46 => self.op_punch(),
            47..=52 => self.op_zero_range(true),
            53..=58 => self.op_zero_range(false),
            59..=63 => self.op_fallocate_grow(),
            64..=72 => self.op_seek(libc::SEEK_DATA),
            73..=81 => self.op_seek(libc::SEEK_HOLE),
            82..=86 => self.op_fsync(),
            87..=90 => self.op_stat(),
            91 if self.model.backing_end > 0 => self.op_shrink_into_backing(),
            91 => self.op_unsupported_fallocate(),
            _ => self.op_concurrent(),
        }
        if let Some(img) = &self.raw_image {
            let len = fs::metadata(img).map(|m| m.len());
            if len.as_ref().ok() != Some(&self.model.size()) {
                self.fail(format!(
                    "the raw image file's length is {len:?}, the model's size {}",
                    self.model.size()
                ));
            }
        }
        if let Some(img) = &self.raw_image {
            let len = fs::metadata(img).map(|m| m.len());
            if len.as_ref().ok() != Some(&self.model.size()) {
                self.fail(format!(
                    "the raw image file's length is {len:?}, the model's size {}",
                    self.model.size()
                ));
            }
        }
        self.done += 1;
        if self.done.is_multiple_of(FULL_CHECK_EVERY) {
            self.check_all();
        }
    }

    fn op_write(&mut self) {
        let off = self.pick_offset();
        let len = self.pick_len(off);
        let buf = random_bytes(self.rng.next_u64(), len as usize);
        self.note(format!("pwrite {off}+{len} (size {})", self.model.size()));
        match errno(self.f().write_at(&buf, off)) {
            Ok(n) if n == buf.len() => {}
            r => self.fail(format!(
                "pwrite {off}+{len} on a growable export: {r:?}, want {len} written"
            )),
        }
        let end = off + len;
        if end > self.model.size() {
            let size = size_rule(
                self.model.format,
                self.model.size(),
                SizeChange::Grow { end },
            )
            .expect("growth is always allowed");
            self.model.resize(size);
        }
        self.model.write(off, &buf);
    }

    fn op_read(&mut self) {
        let off = self.pick_offset();
        let len = self.pick_len(off);
        self.note(format!("pread {off}+{len} (size {})", self.model.size()));
        let mut buf = vec![0u8; len as usize];
        let n = match errno(self.f().read_at(&mut buf, off)) {
            Ok(n) => n,
            Err(e) => self.fail(format!("pread {off}+{len}: errno {e}")),
        };
        let size = self.model.size();
        let want = (off.min(size) as usize)..((off + len).min(size) as usize);
        if n != want.len() {
            self.fail(format!(
                "pread {off}+{len} with size {size} returned {n} bytes, want {}",
                want.len()
            ));
        }
        if buf[..n] != self.model.data[want.clone()] {
            let i = buf[..n]
                .iter()
                .zip(&self.model.data[want.clone()])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.fail(format!(
                "pread {off}+{len}: byte {} is {:#04x}, the model has {:#04x}",
                off + i as u64,
                buf[i],
                self.model.data[want.start + i]
            ));
        }
    }

    fn op_truncate(&mut self) {
        let size = self.model.size();
        let cs = self.model.cluster;
        let r = &mut self.rng;
        let mut to = match r.below(6) {
            0 => size + r.below(5 * KIB),
            1 => size.saturating_sub(r.below(5 * KIB)),
            2 => r.below(size / cs + 2) * cs,
            3 => size / 2 + r.below(size),
            // Small: into the initial data (and a backing file's), so growing again must show
            // zeros there.
            4 => r.below(MIB + 64 * KIB),
            _ => r.below(MAX_SIZE),
        };
        if self.model.format == Format::Qcow2 && r.below(4) != 0 {
            to -= to % 512; // mostly sizes qcow2 can take
        }
        let to = to.min(MAX_SIZE);
        // A qcow2 shrink over data is refused: sometimes punch the tail first so it works.
        if to < size && self.rng.below(2) == 0 {
            self.punch(to, size - to);
        }
        self.note(format!("ftruncate {to} (size {size})"));
        let got = errno(self.f().set_len(to));
        match size_rule(self.model.format, size, SizeChange::Truncate { to }) {
            Err(e) if got == Err(e) => {}
            Err(e) => self.fail(format!("ftruncate {to}: {got:?}, want errno {e}")),
            Ok(_)
                if got == Err(libc::EINVAL)
                    && to < size
                    && self.model.shrink_may_be_refused(to) =>
            {
                self.note("  refused: data past the new end".into());
            }
            Ok(new) if got.is_ok() => self.model.resize(new),
            Ok(new) => self.fail(format!("ftruncate {to}: {got:?}, want size {new}")),
        }
    }

    fn punch(&mut self, off: u64, len: u64) {
        self.note(format!(
            "fallocate PUNCH_HOLE|KEEP_SIZE {off}+{len} (size {})",
            self.model.size()
        ));
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = errno(fallocate(self.f(), mode, off, len)) {
            self.fail(format!("punch hole {off}+{len}: errno {e}"));
        }
        let end = (off + len).min(self.model.size());
        if off < end {
            self.model.zero(off, end);
            self.model.punch_clusters(off, end);
        }
    }

    fn op_punch(&mut self) {
        let off = self.pick_offset();
        let len = self.pick_len(off);
        self.punch(off, len);
    }

    fn op_zero_range(&mut self, keep_size: bool) {
        let off = self.pick_offset();
        let len = self.pick_len(off);
        let size = self.model.size();
        let mut mode = libc::FALLOC_FL_ZERO_RANGE;
        if keep_size {
            mode |= libc::FALLOC_FL_KEEP_SIZE;
        }
        self.note(format!(
            "fallocate ZERO_RANGE{} {off}+{len} (size {size})",
            if keep_size { "|KEEP_SIZE" } else { "" }
        ));
        if let Err(e) = errno(fallocate(self.f(), mode, off, len)) {
            self.fail(format!("zero range {off}+{len}: errno {e}"));
        }
        let end = off + len;
        if !keep_size && end > size {
            let new = size_rule(self.model.format, size, SizeChange::Grow { end })
                .expect("growth is always allowed");
            self.model.resize(new);
        }
        let end = end.min(self.model.size());
        if off < end {
            self.model.zero(off, end);
            self.model.mark_maybe_data(off, end);
        }
    }

    fn op_fallocate_grow(&mut self) {
        let size = self.model.size();
        let r = &mut self.rng;
        let off = match r.below(3) {
            0 => size,
            1 => size + r.below(64 * KIB),
            _ => r.below(size.max(1)), // before EOF: EOPNOTSUPP
        }
        .min(MAX_SIZE - 1);
        let len = self.pick_len(off);
        self.note(format!("fallocate 0 {off}+{len} (size {size})"));
        let got = errno(fallocate(self.f(), 0, off, len));
        if off < size {
            if got != Err(libc::EOPNOTSUPP) {
                self.fail(format!(
                    "fallocate(0) {off}+{len} before EOF {size}: {got:?}, want EOPNOTSUPP"
                ));
            }
            return;
        }
        if let Err(e) = got {
            self.fail(format!(
                "fallocate(0) {off}+{len} at/after EOF {size}: errno {e}"
            ));
        }
        let new = size_rule(self.model.format, size, SizeChange::Grow { end: off + len })
            .expect("growth is always allowed");
        self.model.resize(new);
        self.model.mark_maybe_data(size, new);
    }

    /// Up to six requests at once from as many threads, on adjacent, disjoint ranges inside
    /// the file around one spot (so they share clusters and sectors): writes, hole punches,
    /// zero ranges and reads. Disjoint ranges make the order irrelevant to the model; the size
    /// does not change.
    fn op_concurrent(&mut self) {
        let size = self.model.size();
        let cs = self.model.cluster;
        if size < 4 * cs {
            return;
        }
        let r = &mut self.rng;
        let start = r.below(size / cs - 3) * cs + r.below(cs);
        let end = (start + 1 + r.below(3 * cs)).min(size);
        let n = 2 + r.below(5) as usize;
        let mut cuts: Vec<u64> = (1..n).map(|_| r.range(start, end)).collect();
        cuts.extend([start, end]);
        cuts.sort_unstable();
        cuts.dedup();
        #[derive(Clone, Copy, Debug)]
        enum Kind {
            Write(u64),
            Punch,
            Zero,
            Read,
        }
        let jobs: Vec<(u64, u64, Kind)> = cuts
            .windows(2)
            .map(|w| {
                let kind = match r.below(4) {
                    0 => Kind::Punch,
                    1 => Kind::Zero,
                    2 => Kind::Read,
                    _ => Kind::Write(r.next_u64()),
                };
                (w[0], w[1] - w[0], kind)
            })
            .collect();
        self.note(format!("concurrently (size {size}): {jobs:?}"));
        let files = &self.files;
        let results: Vec<Result<Vec<u8>, i32>> = std::thread::scope(|sc| {
            let handles: Vec<_> = jobs
                .iter()
                .enumerate()
                .map(|(i, &(off, len, kind))| {
                    let f = &files[i % 2];
                    sc.spawn(move || -> Result<Vec<u8>, i32> {
                        match kind {
                            Kind::Write(seed) => {
                                let buf = random_bytes(seed, len as usize);
                                errno(f.write_all_at(&buf, off)).map(|()| Vec::new())
                            }
                            Kind::Punch => {
                                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                                errno(fallocate(f, mode, off, len)).map(|()| Vec::new())
                            }
                            Kind::Zero => {
                                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                                errno(fallocate(f, mode, off, len)).map(|()| Vec::new())
                            }
                            Kind::Read => {
                                let mut buf = vec![0u8; len as usize];
                                errno(f.read_exact_at(&mut buf, off)).map(|()| buf)
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a request thread panicked"))
                .collect()
        });
        for (&(off, len, kind), res) in jobs.iter().zip(results) {
            let got = match res {
                Ok(v) => v,
                Err(e) => self.fail(format!("concurrent {kind:?} {off}+{len}: errno {e}")),
            };
            match kind {
                Kind::Write(seed) => self.model.write(off, &random_bytes(seed, len as usize)),
                Kind::Punch => {
                    self.model.zero(off, off + len);
                    self.model.punch_clusters(off, off + len);
                }
                Kind::Zero => {
                    self.model.zero(off, off + len);
                    self.model.mark_maybe_data(off, off + len);
                }
                Kind::Read => {
                    if got[..] != self.model.data[off as usize..(off + len) as usize] {
                        self.fail(format!(
                            "concurrent read {off}+{len} differs from the model"
                        ));
                    }
                }
            }
        }
    }

    /// Over a backing file: shrinks into the range the backing file covers, where the overlay
    /// has nothing (so a shrink is not refused), and grows back: that range must read as zeros,
    /// not as the backing file's data. The part past the backing file is punched first.
    fn op_shrink_into_backing(&mut self) {
        let size = self.model.size();
        let cs = self.model.cluster;
        if size > self.model.backing_end {
            self.punch(self.model.backing_end, size - self.model.backing_end);
        }
        // The lowest cluster from which on nothing may hold data.
        let free_from = self
            .model
            .maybe_data
            .iter()
            .rposition(|&b| b)
            .map_or(0, |i| i as u64 + 1)
            * cs;
        let low = free_from.next_multiple_of(512);
        let high = self.model.backing_end.min(size);
        if low + 512 >= high {
            self.note(format!(
                "(no shrink into the backing file: data up to {free_from}, size {size})"
            ));
            return;
        }
        let to = self.rng.range(low / 512, high / 512) * 512;
        self.note(format!(
            "ftruncate {to} then {size} (into the backing file)"
        ));
        for (step, len) in [(1, to), (2, size)] {
            if let Err(e) = errno(self.f().set_len(len)) {
                self.fail(format!(
                    "ftruncate {len} (step {step} of shrinking into the backing file): errno {e}"
                ));
            }
            self.model.resize(len);
        }
        let mut buf = vec![0u8; (high - to) as usize];
        match errno(self.f().read_at(&mut buf, to)) {
            Ok(n) if n == buf.len() => {}
            r => self.fail(format!("pread {to}+{}: {r:?}", buf.len())),
        }
        if buf.iter().any(|&b| b != 0) {
            let i = buf.iter().position(|&b| b != 0).unwrap_or(0);
            self.fail(format!(
                "after shrinking to {to} and growing to {size}, byte {} reads {:#04x}: the \
                 backing file shows through",
                to + i as u64,
                buf[i]
            ));
        }
    }

    /// `fallocate(KEEP_SIZE)` alone (preallocation inside the file) is not supported.
    fn op_unsupported_fallocate(&mut self) {
        let off = self.pick_offset();
        let len = self.pick_len(off);
        self.note(format!("fallocate KEEP_SIZE {off}+{len}"));
        let got = errno(fallocate(self.f(), libc::FALLOC_FL_KEEP_SIZE, off, len));
        if got != Err(libc::EOPNOTSUPP) {
            self.fail(format!(
                "fallocate(KEEP_SIZE) {off}+{len}: {got:?}, want EOPNOTSUPP"
            ));
        }
    }

    /// The weakest correct check: data may be reported where the model has zeros (allocated
    /// zeros), a hole only where it has zeros. At EOF, SEEK_HOLE answers EOF and SEEK_DATA
    /// ENXIO (QEMU's export does the same); past EOF both are ENXIO.
    fn op_seek(&mut self, whence: i32) {
        let off = self.pick_offset();
        let size = self.model.size();
        let name = if whence == libc::SEEK_DATA {
            "SEEK_DATA"
        } else {
            "SEEK_HOLE"
        };
        self.note(format!("lseek {off} {name} (size {size})"));
        let got = errno(lseek(self.f(), off, whence));
        let ok = match (whence, got) {
            (_, Err(libc::ENXIO)) if off > size => true,
            (_, _) if off > size => false,
            (libc::SEEK_DATA, Err(libc::ENXIO)) => self.model.zeros(off, size),
            // The bytes skipped over were claimed to be a hole.
            (libc::SEEK_DATA, Ok(r)) => off <= r && r < size && self.model.zeros(off, r),
            (libc::SEEK_HOLE, Ok(r)) if r == size => off <= r,
            // A hole starts at r: at least its first byte is zero.
            (libc::SEEK_HOLE, Ok(r)) => off <= r && r < size && self.model.data[r as usize] == 0,
            _ => false,
        };
        if !ok {
            self.fail(format!(
                "lseek({off}, {name}) with size {size} returned {got:?}, which the model \
                 contradicts"
            ));
        }
    }

    fn op_fsync(&mut self) {
        let data_only = self.rng.below(2) == 0;
        self.note(format!("f{}sync", if data_only { "data" } else { "" }));
        let r = if data_only {
            self.f().sync_data()
        } else {
            self.f().sync_all()
        };
        if let Err(e) = r {
            self.fail(format!("fsync: {e}"));
        }
    }

    fn op_stat(&mut self) {
        self.note("fstat".into());
        let got = self.f().metadata().map(|m| m.len());
        if got.as_ref().ok() != Some(&self.model.size()) {
            self.fail(format!(
                "fstat size {got:?}, the model has {}",
                self.model.size()
            ));
        }
    }

    /// The whole file, and one byte past its end, against the model.
    fn check_all(&mut self) {
        self.note("whole-file check".into());
        self.op_stat();
        let size = self.model.size() as usize;
        let mut buf = vec![0u8; size + 4096];
        let n = match errno(self.f().read_at(&mut buf, 0)) {
            Ok(n) => n,
            Err(e) => self.fail(format!("reading the whole file: errno {e}")),
        };
        if n != size {
            self.fail(format!(
                "reading the whole file gave {n} bytes, want {size}"
            ));
        }
        if buf[..n] != self.model.data[..] {
            let i = buf.iter().zip(&self.model.data).position(|(a, b)| a != b);
            self.fail(format!(
                "the file differs from the model first at byte {i:?}"
            ));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// The seed of one test: `CORO_FUSE_EXERCISER_SEED` as it is (to replay a failure), else a
/// fixed one per test, changed by the suite-wide `CORO_FUSE_THREADS`/`CORO_FUSE_ENGINE`/
/// `CORO_FUSE_AIO` (so test.sh's re-runs explore other sequences).
fn seed_for(combo: u64) -> u64 {
    if let Some(s) = env_u64("CORO_FUSE_EXERCISER_SEED") {
        return s;
    }
    let mut s: u64 = 0x5eed_0012;
    for var in ["CORO_FUSE_THREADS", "CORO_FUSE_ENGINE", "CORO_FUSE_AIO"] {
        for b in std::env::var(var).unwrap_or_default().bytes() {
            s = s.rotate_left(7) ^ u64::from(b);
        }
    }
    s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ combo
}

/// `qemu-img convert -O raw` of the image: what QEMU reads from it.
fn qemu_read(img: &Path, format: Format, dir: &Path) -> Vec<u8> {
    let raw = dir.join("converted.raw");
    let fmt = match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    sh!("qemu-img", "convert", "-f", fmt, "-O", "raw", img, &raw).ok();
    let v = read_all(&raw);
    fs::remove_file(&raw).expect("remove the converted image");
    v
}

/// One test: `backing` puts the qcow2 image over a raw backing file with data (reads fall
/// through to it where the overlay has nothing; zeroing, shrinking and growing must hide it).
fn exercise(format: Format, threads: u16, engine: &str, combo: u64, backing: bool) {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    let dir = disk_workdir();
    if !supports_o_direct(dir.path()) {
        skip(&format!("{} has no O_DIRECT", dir.path().display()));
        return;
    }
    let ops = env_u64("CORO_FUSE_EXERCISER_OPS").unwrap_or(DEFAULT_OPS) as usize;
    let seed = seed_for(combo);
    // qcow2 clusters: 64 KiB with two threads, 4 KiB (coroutine) or 512 bytes (async) with one.
    let cluster = match (format, threads, engine) {
        (Format::Raw, ..) => 4 * KIB,
        (Format::Qcow2, 2, _) => 64 * KIB,
        (Format::Qcow2, _, "async") => 512,
        (Format::Qcow2, ..) => 4 * KIB,
    };
    let img = dir.path().join(match format {
        Format::Raw => "ex.img",
        Format::Qcow2 => "ex.qcow2",
    });
    let initial = 300 * KIB as usize..400 * KIB as usize;
    let mut data = match format {
        Format::Raw => vec![0u8; (MIB + 333) as usize],
        Format::Qcow2 => vec![0u8; MIB as usize],
    };
    match format {
        Format::Raw => {
            sparse_image(&img, data.len() as u64);
            let fill = random_bytes(seed, initial.len());
            open_rw(&img)
                .write_all_at(&fill, initial.start as u64)
                .expect("initial data");
            data[initial.clone()].copy_from_slice(&fill);
        }
        Format::Qcow2 => {
            let mut create = tool("qemu-img");
            create.args(["create", "-q", "-f", "qcow2", "-o"]);
            create.arg(format!("cluster_size={cluster}"));
            if backing {
                // Data everywhere but for a hole at 512 KiB; the overlay is as big.
                let base = dir.path().join("base.raw");
                let len = data.len();
                data.copy_from_slice(&random_bytes(seed ^ 1, len));
                data[512 * KIB as usize..576 * KIB as usize].fill(0);
                fs::write(&base, &data).expect("backing file");
                create.args(["-F", "raw", "-b", "base.raw"]);
            }
            run(create.arg(&img).arg(data.len().to_string())).ok();
            sh!(
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 300k 100k",
                &img
            )
            .ok();
            data[initial.clone()].fill(0x5a);
        }
    }
    let base_bytes = backing.then(|| read_all(&dir.path().join("base.raw")));
    let mut maybe_data = vec![false; data.len().div_ceil(cluster as usize)];
    maybe_data[initial.start / cluster as usize..initial.end.div_ceil(cluster as usize)].fill(true);

    let what =
        format!(
        "exerciser {format:?}{} --threads {threads} --engine {engine} (cluster {cluster}), {ops} \
         ops; replay: CORO_FUSE_EXERCISER_SEED={seed:#x} CORO_FUSE_EXERCISER_OPS={ops} cargo \
         test -p tests --test exerciser {}",
        if backing { " over a raw backing file" } else { "" },
        test_name()
    );
    let threads_arg = threads.to_string();
    // The model expects a whole-cluster punch to free the cluster: QEMU's `discard=unmap`
    // (the default, `ignore`, keeps everything allocated).
    let args = [
        "--growable",
        "--discard",
        "unmap",
        "--cache",
        "none",
        "--threads",
        &threads_arg,
        "--engine",
        engine,
    ];
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = Export::start(&img, &mnt, &args);
    let mut run = Run {
        files: [open_rw(e.path()), open_direct(e.path())],
        cur: 0,
        model: Model {
            format,
            data,
            cluster,
            maybe_data,
            backing_end: if backing { MIB } else { 0 },
        },
        rng: Prng::new(seed),
        log: VecDeque::new(),
        done: 0,
        what: what.clone(),
        raw_image: (format == Format::Raw).then(|| img.clone()),
    };
    run.check_all();
    if backing {
        run.op_shrink_into_backing();
    }
    while run.done < ops {
        run.step();
    }
    run.check_all();
    let Run { files, model, .. } = run;
    drop(files);
    e.stop_ok();

    if format == Format::Qcow2 {
        let out = run_cmd_check(&img);
        assert_eq!(
            out.code(),
            Some(0),
            "{what}: qemu-img check after a clean stop: {out}"
        );
    }
    // QEMU reads a raw file's length rounded up to 512 bytes (zeros); the file itself must be
    // exactly the model.
    // QEMU reads a raw file's length rounded up to 512 bytes (zeros); the file itself must be
    // exactly the model.
    let back = qemu_read(&img, format, dir.path());
    let mut want = model.data.clone();
    if format == Format::Raw {
        assert_same_bytes(
            &read_all(&img),
            &model.data,
            &format!("{what}: the raw image file"),
        );
        want.resize(want.len().next_multiple_of(512), 0);
    }
    assert_eq!(
        back.len(),
        want.len(),
        "{what}: qemu-img's size of the image after a clean stop (model size {})",
        model.size()
    );
    assert_same_bytes(
        &back,
        &want,
        &format!("{what}: qemu-img convert vs the model"),
    );

    if let Some(base) = &base_bytes {
        assert_same_bytes(
            &read_all(&dir.path().join("base.raw")),
            base,
            &format!("{what}: the backing file (must never be written)"),
        );
    }

    // What a client saw is what a restart shows.
    let mut e = Export::start(&img, &mnt, &args);
    assert_eq!(
        file_size(e.path()),
        model.size(),
        "{what}: size after a restart"
    );
    assert_same_bytes(
        &read_all(e.path()),
        &model.data,
        &format!("{what}: contents after a restart"),
    );
    e.stop_ok();
}

fn run_cmd_check(img: &Path) -> Output {
    run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(img))
}

macro_rules! exerciser_tests {
    ($($name:ident: $format:ident, $threads:expr, $engine:expr, $combo:expr, $backing:expr;)*) => {
        $(
            #[test]
            fn $name() {
                exercise(Format::$format, $threads, $engine, $combo, $backing);
            }
        )*
    };
}

exerciser_tests! {
    exerciser_raw_1_thread_coroutine: Raw, 1, "coroutine", 1, false;
    exerciser_raw_2_threads_coroutine: Raw, 2, "coroutine", 2, false;
    exerciser_raw_1_thread_async: Raw, 1, "async", 3, false;
    exerciser_raw_2_threads_async: Raw, 2, "async", 4, false;
    exerciser_qcow2_1_thread_coroutine: Qcow2, 1, "coroutine", 5, false;
    exerciser_qcow2_2_threads_coroutine: Qcow2, 2, "coroutine", 6, false;
    exerciser_qcow2_1_thread_async: Qcow2, 1, "async", 7, false;
    exerciser_qcow2_2_threads_async: Qcow2, 2, "async", 8, false;
    exerciser_qcow2_overlay_1_thread_coroutine: Qcow2, 1, "coroutine", 9, true;
    exerciser_qcow2_overlay_2_threads_async: Qcow2, 2, "async", 10, true;
}
