//! Write requests: claiming the guest range, writing in place or into new clusters with
//! copy-on-write of the partial ones, zeroing and discarding.
//!
//! QEMU: `block/qcow2.c` (`qcow2_co_pwritev_part()`, `qcow2_co_pwritev_task()`,
//! `qcow2_co_pwrite_zeroes()`, `qcow2_co_pdiscard()`), `block/qcow2-cluster.c`
//! (`handle_dependencies()`, `perform_cow()`, `qcow2_subcluster_zeroize()`,
//! `qcow2_cluster_discard()`).
//!
//! A write is a loop of: lock → plan ([`super::cluster::WritePlan`]) → unlock → data I/O →
//! (for new clusters) lock → link in the L2 cache → unlock → write the changed L2 entries. New clusters get the whole clusters' bytes in one
//! write: the head and tail of a partially written cluster are first read from the cluster they
//! replace (data, compressed data, zeros, or [`Qcow2Driver::co_read_below`]) — QEMU's
//! copy-on-write, done here in one buffer so that a 1 MiB write into an empty image is one data
//! write and one L2 update. When the copied bytes are not zeros into a hole, an `fdatasync`
//! separates the data write from the L2 update (see the crash-safety section of `mod.rs`).

use std::sync::atomic::Ordering;

use runtime::CoMutexGuard;

use super::cluster::{Alloc, WritePlan};
use super::{Meta, Qcow2Driver};
use crate::{BlockError, Result};

/// Writes of zeros as data go out in pieces of at most this size.
const ZERO_CHUNK: u64 = 1 << 20;

/// A claimed guest range; released (and waiters woken) on drop.
pub(super) struct Claim<'a> {
    driver: &'a Qcow2Driver,
    range: (u64, u64),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut m = self.driver.meta.co_lock();
        if let Some(i) = m.claims.iter().position(|r| *r == self.range) {
            m.claims.swap_remove(i);
        }
        // A waiter counted itself under the lock before queueing (and unlocking): if the count
        // is zero here, nobody waits for our range.
        let waiters = m.claim_waiters;
        drop(m);
        if waiters > 0 {
            self.driver.claim_waiters.restart_all();
        }
    }
}

impl Qcow2Driver {
    /// Claims the clusters of guest bytes `[start, end)`, waiting while any of them is claimed
    /// by another request. QEMU: `handle_dependencies()` waiting on `dependent_requests`.
    ///
    /// Truncate claims every cluster, so the size does not change while a claim is held — but
    /// it may have changed while waiting: requests check their range again once claimed.
    pub(super) fn co_claim(&self, start: u64, end: u64) -> Claim<'_> {
        self.co_claim_locked(start, end).0
    }

    /// [`Self::co_claim`], returning the metadata lock still held (drop the guard before the
    /// claim: releasing a claim takes the lock).
    fn co_claim_locked(&self, start: u64, end: u64) -> (Claim<'_>, CoMutexGuard<'_, Meta>) {
        let cs = self.cluster_size();
        let range = (start - start % cs, end.saturating_add(cs - 1) / cs * cs);
        let mut m = self.meta.co_lock();
        while m.claims.iter().any(|&(s, e)| s < range.1 && range.0 < e) {
            m.claim_waiters += 1;
            m = self.claim_waiters.co_wait_locked(m);
            m.claim_waiters -= 1;
        }
        m.claims.push(range);
        let claim = Claim {
            driver: self,
            range,
        };
        (claim, m)
    }

    /// Checks a write request: writable, not corrupt, inside the image.
    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.is_corrupt() {
            return Err(super::corrupt_refusal("writes are"));
        }
        self.check_request(offset, len)
    }

    /// Writes `buf` at guest `offset`. QEMU: `qcow2_co_pwritev_part()`.
    pub(super) fn co_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Claim and first plan under one acquisition of the lock.
        let (_claim, m) = self.co_claim_locked(offset, offset + buf.len() as u64);
        // A shrink may have run while we waited.
        if let Err(e) = self.check_request(offset, buf.len() as u64) {
            drop(m); // before the claim
            return Err(e);
        }
        self.co_write_planning(m, offset, buf)
    }

    /// The write loop, with the range claimed by the caller.
    pub(super) fn co_write_claimed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.co_write_planning(self.meta.co_lock(), offset, buf)
    }

    /// The write loop, planning its first piece under `m` (which it releases).
    fn co_write_planning<'a>(
        &'a self,
        mut m: CoMutexGuard<'a, Meta>,
        offset: u64,
        buf: &[u8],
    ) -> Result<()> {
        let mut done = 0usize;
        loop {
            let pos = offset + done as u64;
            let rest = &buf[done..];
            let plan = self.co_plan_write(&mut m, pos, rest.len() as u64);
            drop(m);
            done += match plan? {
                WritePlan::InPlace { host, len } => {
                    log::trace!(
                        "qcow2: write {len} bytes at {pos}: cluster allocated, in place at host \
                         {host}; metadata lock released"
                    );
                    self.co_write_host(host, &rest[..len as usize])?;
                    len as usize
                }
                WritePlan::Alloc(a) => {
                    log::trace!(
                        "qcow2: write at {pos}: {} new cluster(s) at host {}; metadata lock \
                         released for the data write",
                        a.old.len(),
                        a.host
                    );
                    self.co_write_alloc(&a, pos, rest)?
                }
            };
            if done >= buf.len() {
                return Ok(());
            }
            m = self.meta.co_lock();
        }
    }

    /// Writes the part of `buf` (at guest `pos`) that falls in the new clusters of `a`, with
    /// the partial clusters' other bytes copied from the old ones, then links them. Returns the
    /// bytes of `buf` consumed. If the data write fails the new clusters are freed; if linking
    /// fails they are leaked (the L2 entries may have reached the file). QEMU:
    /// `qcow2_co_pwritev_task()` + `perform_cow()` + `qcow2_alloc_cluster_link_l2()`.
    fn co_write_alloc(&self, a: &Alloc, pos: u64, buf: &[u8]) -> Result<usize> {
        let cs = self.cluster_size();
        let n = a.old.len() as u64;
        let total = (n * cs) as usize;
        let head = (pos - a.guest) as usize;
        let len = buf.len().min(total - head);
        // Never written since open, and past the file as opened: a hole, reading as zeros.
        let fresh = a.host >= self.host_len.load(Ordering::Relaxed);
        let res = if head == 0 && len == total {
            self.co_write_host(a.host, &buf[..len])
        } else {
            log::trace!(
                "qcow2: copy-on-write: {head} bytes before and {} after the request come from \
                 the old cluster(s); one {total}-byte data write",
                total - head - len
            );
            self.co_cow_buffer(a, head, &buf[..len]).and_then(|data| {
                self.co_write_host(a.host, &data)?;
                // The copied bytes were durable in the old cluster: they must be durable in
                // the new one before the L2 entry can be, or a power cut loses them (the
                // entry on disk, the data not). Unless the copy is zeros into a hole. QEMU:
                // `qcow2_cache_depends_on_flush()` in `perform_cow()`.
                let copied = [&data[..head], &data[head + len..]];
                if !(fresh && copied.iter().all(|c| c.iter().all(|&b| b == 0))) {
                    self.co_flush_host()?;
                }
                Ok(())
            })
        };
        let mut m = self.meta.co_lock();
        if let Err(e) = res {
            self.co_free_quietly(&mut m, a.host, n); // nothing references them
            return Err(e);
        }
        if !self.direct {
            // O_DIRECT: the L2 write is a read-modify-write of whole sectors, which two
            // requests linking into one sector must not do at the same time.
            log::trace!(
                "qcow2: data at host {} written; L2 entries written under the metadata lock \
                 (O_DIRECT: a read-modify-write of their sector)",
                a.host
            );
            if let Err(e) = self.co_link(&mut m, a) {
                self.leak_after_failed_link(a.host, n, &e);
                return Err(e);
            }
            return Ok(len);
        }
        // The L2 write goes out after the lock is released: other requests plan and link
        // meanwhile, instead of queueing behind a write that waits for the file's data writes.
        let w = match self.co_link_in_cache(&mut m, a) {
            Ok(w) => w,
            Err(e) => {
                self.leak_after_failed_link(a.host, n, &e);
                return Err(e);
            }
        };
        drop(m);
        log::trace!(
            "qcow2: data at host {} written; L2 entries linked in the cache, written to the \
             file now",
            a.host
        );
        self.co_link_unlocked(a, w)?;
        Ok(len)
    }

    /// The new clusters' full contents: `data` at byte `head`, the rest from the old clusters.
    fn co_cow_buffer(&self, a: &Alloc, head: usize, data: &[u8]) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let total = a.old.len() * cs as usize;
        let mut out = vec![0u8; total];
        let tail = head + data.len();
        if head > 0 {
            let old = self.decode_l2_entry(a.old[0])?;
            self.co_read_mapping(old, a.guest, &mut out[..head])?;
        }
        out[head..tail].copy_from_slice(data);
        if tail < total {
            let last = a.old.len() - 1;
            let old = self.decode_l2_entry(a.old[last])?;
            self.co_read_mapping(old, a.guest + tail as u64, &mut out[tail..])?;
        }
        Ok(out)
    }

    /// Writes `len` zero bytes as data, in bounded pieces (range already claimed).
    fn co_write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.co_write_claimed(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Runs `f(m, offset, clusters)` over the whole clusters of `[start, end)` (cluster
    /// aligned), one L2 table at a time, each under the lock.
    fn co_for_each_l2_run(
        &self,
        start: u64,
        end: u64,
        f: impl Fn(&mut super::Meta, u64, usize) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let per_l2 = cs * self.header.l2_entries();
        let mut pos = start;
        while pos < end {
            let stop = end.min((pos / per_l2 + 1) * per_l2);
            let mut m = self.meta.co_lock();
            f(&mut m, pos, ((stop - pos) / cs) as usize)?;
            pos = stop;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole clusters become zero entries (v3) or,
    /// with `may_unmap` on v2 without a backing file, unallocated ones; partial clusters (and
    /// other v2 cases: an unallocated cluster would show the backing file) are written as zero
    /// data. QEMU: `qcow2_co_pwrite_zeroes()`.
    pub(super) fn co_zero(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _claim = self.co_claim(offset, offset + len);
        self.check_request(offset, len)?; // a shrink may have run while we waited
        let size = self.size.load(Ordering::Acquire);
        self.co_zero_claimed(offset, len, may_unmap, size)
    }

    /// The body of [`Self::co_zero`], with the range claimed by the caller; `size` is the
    /// image size the range is judged against (a cluster that ends at `size` counts as whole).
    /// Truncate calls it with the new size before publishing it.
    pub(super) fn co_zero_claimed(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        size: u64,
    ) -> Result<()> {
        let end = offset + len;
        let (start, stop) = self.whole_clusters(offset, end, size);
        if start >= stop {
            return self.co_write_zero_data(offset, len);
        }
        if offset < start {
            self.co_write_zero_data(offset, start - offset)?;
        }
        if self.header.version >= 3 || (may_unmap && !self.has_backing()) {
            self.co_for_each_l2_run(start, stop, |m, pos, n| {
                self.co_zero_clusters(m, pos, n, may_unmap)
            })?;
        } else {
            self.co_write_zero_data(start, stop - start)?;
        }
        if stop < end {
            self.co_write_zero_data(stop, end - stop)?;
        }
        Ok(())
    }

    /// Discards the whole clusters of the range (partial ones are left alone: discard is a
    /// hint): v3 zero entries, v2 unallocated entries (with a backing file its data shows
    /// through again, as in QEMU: discarded contents are unspecified), their clusters released.
    /// QEMU: `qcow2_co_pdiscard()`.
    pub(super) fn co_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _claim = self.co_claim(offset, offset + len);
        // The size is stable while we hold a claim (truncate claims everything); a shrink may
        // have run while we waited.
        self.check_request(offset, len)?;
        let size = self.size.load(Ordering::Acquire);
        let (start, stop) = self.whole_clusters(offset, offset + len, size);
        if start >= stop {
            return Ok(());
        }
        self.co_for_each_l2_run(start, stop, |m, pos, n| {
            self.co_zero_clusters(m, pos, n, true)
        })
    }

    /// The whole clusters inside `[offset, end)`: a cluster that ends at the image's end
    /// (`size`) counts as whole even when the size is not a multiple of the cluster size.
    fn whole_clusters(&self, offset: u64, end: u64, size: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        let start = offset.div_ceil(cs) * cs;
        let stop = if end == size {
            end.div_ceil(cs) * cs
        } else {
            end - end % cs
        };
        (start, stop.max(start))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::super::Qcow2Driver;
    use crate::{FileDriver, FileOptions};

    /// 64 KiB clusters, 1 GiB.
    fn tiny_image(path: &std::path::Path) {
        super::super::test_image::tiny_image(path, 16, 1 << 30);
    }

    /// An overlapping claim waits for the first one to go; a disjoint one does not.
    #[test]
    fn overlapping_claims_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.qcow2");
        tiny_image(&path);
        let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
        let d = Arc::new(Qcow2Driver::open(Arc::new(file)).expect("qcow2"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let note = |log: &Arc<Mutex<Vec<&'static str>>>, s| log.lock().expect("log").push(s);
        let (d1, l1) = (d.clone(), log.clone());
        let first = runtime::spawn(move || {
            let _c = d1.co_claim(1000, 70_000); // clusters 0 and 1
            note(&l1, "1 claimed");
            runtime::co_sleep(Duration::from_millis(30));
            note(&l1, "1 releases");
        });
        let (d2, l2) = (d.clone(), log.clone());
        let overlapping = runtime::spawn(move || {
            let _c = d2.co_claim(65_536 + 5, 65_536 + 6); // cluster 1
            note(&l2, "2 claimed");
        });
        assert_eq!(
            d.meta.co_lock().claim_waiters,
            1,
            "the overlapping claim waits"
        );
        let (d3, l3) = (d.clone(), log.clone());
        let disjoint = runtime::spawn(move || {
            let _c = d3.co_claim(131_072, 131_073); // cluster 2
            note(&l3, "3 claimed");
        });
        for h in [first, overlapping, disjoint] {
            if h.join().is_err() {
                panic!("a coroutine panicked");
            }
        }
        let log = log.lock().expect("log").clone();
        assert_eq!(log, ["1 claimed", "3 claimed", "1 releases", "2 claimed"]);
        let m = d.meta.co_lock();
        assert!(m.claims.is_empty());
        assert_eq!(m.claim_waiters, 0);
    }

    /// A write that waited for a claim while a shrink took it first fails with OutOfRange
    /// instead of allocating past the new end.
    #[test]
    fn write_after_a_concurrent_shrink_is_out_of_range() {
        use crate::{BlockDriver, BlockError};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.qcow2");
        tiny_image(&path);
        let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
        let d = Arc::new(Qcow2Driver::open(Arc::new(file)).expect("qcow2"));
        const AT: u64 = 100 << 20;
        let d1 = d.clone();
        let holder = runtime::spawn(move || {
            let _c = d1.co_claim(AT, AT + 1);
            runtime::co_sleep(Duration::from_millis(30));
        });
        let d2 = d.clone();
        let shrink = runtime::spawn(move || d2.co_truncate(50 << 20)); // queued first
        let (d3, d4) = (d.clone(), d.clone());
        let write = runtime::spawn(move || d3.co_pwritev(AT, &[7u8; 4096]));
        let zero = runtime::spawn(move || d4.co_pwrite_zeroes(AT, 65536, false));
        let d5 = d.clone();
        let discard = runtime::spawn(move || d5.co_pdiscard(AT, 65536));
        assert!(holder.join().is_ok());
        assert!(matches!(shrink.join(), Ok(Ok(()))));
        for (what, h) in [("write", write), ("zero", zero), ("discard", discard)] {
            match h.join() {
                Ok(Err(BlockError::OutOfRange { .. })) => {}
                Ok(r) => panic!("{what} after the shrink: {r:?}"),
                Err(_) => panic!("{what}: the coroutine panicked"),
            }
        }
        assert_eq!(d.getlength(), 50 << 20);
        let m = d.meta.co_lock();
        assert!(m.l1.iter().all(|&e| e == 0), "nothing was allocated");
    }

    /// The hand-made image is valid for the driver: a write allocates, reads back, and the
    /// driver's own view stays consistent after a flush.
    #[test]
    fn tiny_image_write_read() {
        use crate::BlockDriver;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.qcow2");
        tiny_image(&path);
        let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
        let d = Qcow2Driver::open(Arc::new(file)).expect("qcow2");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let back = runtime::spawn(move || {
            d.co_pwritev(12_345, &data).expect("write");
            d.co_flush().expect("flush");
            let mut back = vec![0u8; data.len()];
            d.co_preadv(12_345, &mut back).expect("read");
            let mut before = vec![1u8; 100];
            d.co_preadv(12_245, &mut before).expect("read before");
            assert!(
                before.iter().all(|&b| b == 0),
                "copy-on-write head is zeros"
            );
            back == data
        })
        .join();
        assert!(matches!(back, Ok(true)));
    }
}
