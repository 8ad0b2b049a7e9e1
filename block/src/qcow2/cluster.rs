//! Guest clusters: the two-level map (L1 → L2 → host cluster), and changing it — allocating
//! and copying L2 tables, planning allocating writes, linking new clusters, zeroing entries.
//!
//! QEMU: `block/qcow2-cluster.c` (`qcow2_get_host_offset()`, `l2_allocate()`,
//! `get_cluster_table()`, `qcow2_alloc_host_offset()`, `handle_copied()`, `handle_alloc()`,
//! `qcow2_alloc_cluster_link_l2()`, `zero_in_l2_slice()`, `discard_in_l2_slice()`) and
//! `qcow2_get_cluster_type()` in `block/qcow2.h`.
//!
//! Every function here runs with the metadata lock held (it takes `&mut Meta`) and may yield on
//! metadata I/O. Guest data is never read or written here: [`WritePlan`] tells the caller
//! ([`super::write`]) where to put it.
//!
//! ## COPIED
//!
//! `QCOW_OFLAG_COPIED` on an L1 or L2 entry says the table or cluster it points to has refcount
//! exactly 1: nothing else (no internal snapshot) uses it, so it may be changed in place. A data
//! cluster without it is shared, or compressed, or a zero cluster: a write gets a new cluster
//! (copy-on-write) and the old one loses a reference. An L2 table without it is copied to a new
//! cluster before its first change (`Qcow2Driver::co_l2_for_write`). Everything we allocate
//! has refcount 1 and gets COPIED.

use super::cache::{get_u64, set_u64, Pin};
use super::{Meta, Qcow2Driver, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::{BlockError, Result};

/// What a guest cluster maps to: the plan the lookup hands to the I/O path.
/// (cloud-hypervisor `qcow/metadata.rs` calls it a mapping; QEMU `QCow2SubclusterType`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Reads as zeros (v3 zero flag, with or without a preallocated host cluster).
    Zero,
    /// Not allocated: reads from below ([`Qcow2Driver::co_read_below`]).
    Unallocated,
    /// Data at this host offset (of the cluster start; cluster aligned, inside the file).
    Data(u64),
    /// Compressed data (deflate or zstd, per the header's compression type): host offset and
    /// an upper bound of its length in bytes.
    Compressed(u64, u64),
}

/// Where an allocating write puts its data. QEMU: `QCowL2Meta`.
#[derive(Debug)]
pub struct Alloc {
    /// Guest offset of the first cluster (cluster aligned).
    pub guest: u64,
    /// Host offset of the first new cluster; the clusters are contiguous.
    pub host: u64,
    /// The L2 entries being replaced, one per cluster: the copy-on-write source for partial
    /// clusters, and the references dropped after linking.
    pub old: Vec<u64>,
}

/// An L2 change made in the cache, still to be written to the file (see
/// [`Qcow2Driver::co_link_in_cache`]).
pub(super) struct L2Write {
    /// Host offset of the table.
    l2: u64,
    /// Index of the first changed entry.
    first: usize,
    /// The changed entries, as they go to the file.
    bytes: Vec<u8>,
    _pin: Pin,
}

/// What a write of a range should do, for its first clusters.
#[derive(Debug)]
pub enum WritePlan {
    /// Overwrite in place `len` bytes at host offset `host` (clusters with COPIED set).
    InPlace { host: u64, len: u64 },
    /// Write into newly allocated clusters, then link them.
    Alloc(Alloc),
}

/// Whether an L2 entry is a plain data cluster owned by this table alone (write in place).
fn is_copied_data(entry: u64) -> bool {
    entry & OFLAG_COPIED != 0
        && entry & (OFLAG_COMPRESSED | OFLAG_ZERO) == 0
        && entry & OFFSET_MASK != 0
}

impl Qcow2Driver {
    /// (L1 index, L2 index) of the cluster containing guest `offset`.
    pub(super) fn l1_l2_index(&self, offset: u64) -> (usize, usize) {
        let cluster = offset >> self.header.cluster_bits;
        let l2_entries = self.header.l2_entries();
        (
            (cluster / l2_entries) as usize,
            (cluster % l2_entries) as usize,
        )
    }

    /// The L2 table at host offset `l2_offset`, from the cache or the file.
    pub(super) fn co_l2_table<'m>(&self, m: &'m mut Meta, l2_offset: u64) -> Result<&'m mut [u8]> {
        if let Some(i) = m.l2_cache.find(l2_offset) {
            return Ok(m.l2_cache.at(i));
        }
        self.co_load_l2_table(m, l2_offset)
    }

    /// A cache miss of [`Self::co_l2_table`]: reads the table and caches it.
    #[cold]
    fn co_load_l2_table<'m>(&self, m: &'m mut Meta, l2_offset: u64) -> Result<&'m mut [u8]> {
        let cs = self.cluster_size();
        let end = self.host_len.load(std::sync::atomic::Ordering::Relaxed);
        if !matches!(l2_offset.checked_add(cs), Some(e) if e <= end) {
            return Err(self.signal_corruption(format!(
                "L2 table at {l2_offset:#x} extends beyond the end of the file"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.co_read_host(l2_offset, &mut raw)?;
        Ok(m.l2_cache.insert(l2_offset, raw.into()))
    }

    /// The host offset of the L2 table for L1 index `l1_index` (0: none), checked.
    fn l2_offset(&self, m: &Meta, l1_index: usize) -> Result<u64> {
        let Some(&entry) = m.l1.get(l1_index) else {
            // The header check and truncate keep the L1 table covering the size.
            return Err(self.signal_corruption(format!("L1 index {l1_index} beyond the L1 table")));
        };
        let l2 = entry & OFFSET_MASK;
        if l2 != 0 {
            self.check_host_cluster(l2, "L2 table")?;
        }
        Ok(l2)
    }

    /// The raw L2 entry for guest `offset` (0 when its L1 entry is empty).
    pub(super) fn co_l2_entry(&self, m: &mut Meta, offset: u64) -> Result<u64> {
        let (l1_index, l2_index) = self.l1_l2_index(offset);
        let l2 = self.l2_offset(m, l1_index)?;
        if l2 == 0 {
            return Ok(0);
        }
        Ok(get_u64(self.co_l2_table(m, l2)?, l2_index))
    }

    /// Maps the guest cluster containing `offset` (< size). QEMU: `qcow2_get_host_offset()`.
    pub(super) fn co_lookup_locked(&self, m: &mut Meta, offset: u64) -> Result<Mapping> {
        let entry = self.co_l2_entry(m, offset)?;
        self.decode_l2_entry(entry)
    }

    /// QEMU: `qcow2_get_cluster_type()` (no subclusters).
    pub(super) fn decode_l2_entry(&self, entry: u64) -> Result<Mapping> {
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.compressed_extent(entry);
            if host >= self.host_len.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(self.signal_corruption(format!(
                    "compressed cluster at {host:#x} is beyond the end of the file"
                )));
            }
            return Ok(Mapping::Compressed(host, len));
        }
        if entry & OFLAG_ZERO != 0 {
            if self.header.version < 3 {
                return Err(
                    self.signal_corruption("zero cluster entry found in a version 2 image".into())
                );
            }
            return Ok(Mapping::Zero);
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.check_host_cluster(host, "data cluster")?;
        Ok(Mapping::Data(host))
    }

    /// A compressed entry's host offset and the length to read from there (to the end of its
    /// last 512-byte sector).
    pub(super) fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        // qcow2.txt: x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 extra sectors.
        let x = 62 - (self.header.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
        (host, sectors * 512 - (host & 511))
    }

    /// The mapping at `offset` and how many bytes (≤ `max`) continue it: zero/unallocated
    /// clusters of the same kind, or data clusters contiguous on the host. A compressed
    /// cluster is a run of its own.
    pub(super) fn co_map_run(&self, m: &mut Meta, offset: u64, max: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let first = self.co_lookup_locked(m, offset)?;
        let mut run = (cs - offset % cs).min(max);
        if matches!(first, Mapping::Compressed(..)) {
            return Ok((first, run));
        }
        while run < max {
            let next = self.co_lookup_locked(m, offset + run)?;
            let continues = match (first, next) {
                (Mapping::Zero, Mapping::Zero) => true,
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Data(h), Mapping::Data(n)) => n == h + offset % cs + run,
                _ => false,
            };
            if !continues {
                break;
            }
            run = (run + cs).min(max);
        }
        Ok((first, run))
    }

    // ---- changing the map ----

    /// Writes L1 entry `index` (in memory and in the file).
    pub(super) fn co_set_l1_entry(&self, m: &mut Meta, index: usize, entry: u64) -> Result<()> {
        self.co_write_meta(m.l1_offset + index as u64 * 8, &entry.to_be_bytes())?;
        m.l1[index] = entry;
        m.tables_changed();
        Ok(())
    }

    /// Sets `entries` of the L2 table at `l2` from index `first`, write-through. If the write
    /// fails, the cache is made to agree with the file again ([`Self::co_resync_l2_entries`];
    /// the error is then `Corrupt` if even that fails).
    pub(super) fn co_set_l2_entries(
        &self,
        m: &mut Meta,
        l2: u64,
        first: usize,
        entries: &[u64],
    ) -> Result<()> {
        let table = self.co_l2_table(m, l2)?;
        for (i, &e) in entries.iter().enumerate() {
            set_u64(table, first + i, e);
        }
        let bytes = table[first * 8..(first + entries.len()) * 8].to_vec();
        let res = self.co_write_meta(l2 + first as u64 * 8, &bytes);
        if let Err(e) = res {
            return Err(self.co_resync_l2_entries(m, l2, first, entries.len(), e));
        }
        Ok(())
    }

    /// After the write of L2 entries `[first, first + n)` of the table at `l2` failed with
    /// `err` (it may have landed in full, in part or not at all), makes the cache say what
    /// the file says; returns the error to report. An unpinned table is simply dropped and
    /// reloaded when next needed. A pinned one must stay: it holds entries changed by unlocked
    /// links in flight (`co_link_unlocked`, possibly the caller's own) that the file lacks yet,
    /// so only the failed range is read back — and if even that fails, the image is marked
    /// corrupt.
    fn co_resync_l2_entries(
        &self,
        m: &mut Meta,
        l2: u64,
        first: usize,
        n: usize,
        err: BlockError,
    ) -> BlockError {
        if !m.l2_cache.is_pinned(l2) {
            m.l2_cache.forget(l2);
            return err;
        }
        let at = l2 + first as u64 * 8;
        let mut disk = vec![0u8; n * 8];
        if let Err(e2) = self.co_read_host(at, &mut disk) {
            return self.signal_corruption(format!(
                "L2 entries at {at:#x} unknown: writing them failed ({err}), then reading \
                 them back ({e2})"
            ));
        }
        let i = m
            .l2_cache
            .find(l2)
            .expect("a pinned table stays cached while the lock is held");
        m.l2_cache.at(i)[first * 8..first * 8 + disk.len()].copy_from_slice(&disk);
        err
    }

    /// The L2 table for `l1_index`, ready to be changed: allocated (zeroed) if the L1 entry is
    /// empty, copied to a new cluster if it is shared (COPIED clear). QEMU: `l2_allocate()`.
    ///
    /// Order: new cluster's refcount → table contents → L1 entry → old table's refcount.
    pub(super) fn co_l2_for_write(&self, m: &mut Meta, l1_index: usize) -> Result<u64> {
        let old = self.l2_offset(m, l1_index)?;
        let entry = m.l1[l1_index];
        if old != 0 && entry & OFLAG_COPIED != 0 {
            self.check_no_overlap(m, old, self.cluster_size(), "an L2 table")?;
            return Ok(old);
        }
        let cs = self.cluster_size();
        let contents: Box<[u8]> = if old == 0 {
            vec![0u8; cs as usize].into()
        } else {
            self.co_l2_table(m, old)?.to_vec().into()
        };
        let new = self.co_alloc_clusters(m, 1)?;
        log::trace!(
            "qcow2: new L2 table for L1 entry {l1_index} at host {new}: written and flushed \
             before the L1 entry points to it"
        );
        let res = self
            .check_no_overlap(m, new, cs, "a new L2 table")
            .and_then(|()| self.check_no_table_overlap(m, new, cs, "a new L2 table"))
            .and_then(|()| self.check_not_pinned(m, new, "a new L2 table"))
            .and_then(|()| self.co_write_meta(new, &contents))
            .and_then(|()| self.co_flush_host()); // contents durable before the L1 entry
        if let Err(e) = res {
            self.co_free_quietly(m, new, 1);
            return Err(e);
        }
        m.l2_cache.insert(new, contents);
        if let Err(e) = self.co_set_l1_entry(m, l1_index, new | OFLAG_COPIED) {
            m.l2_cache.forget(new);
            self.leak_after_failed_link(new, 1, &e);
            return Err(e);
        }
        if old != 0 {
            self.defer_free(m, old, 1);
        }
        Ok(new)
    }

    /// Plans a write of `len` bytes at guest `offset`: in place over the leading clusters that
    /// have COPIED set, or else new clusters for the leading ones that need allocation (all in
    /// one L2 table, allocated contiguously, refcounts already on disk). The plan covers a
    /// prefix of the range; the caller loops. QEMU: `qcow2_alloc_host_offset()`.
    pub(super) fn co_plan_write(&self, m: &mut Meta, offset: u64, len: u64) -> Result<WritePlan> {
        let cs = self.cluster_size();
        let (l1_index, l2_index) = self.l1_l2_index(offset);
        let clusters = (offset % cs + len).div_ceil(cs);
        let max = clusters.min(self.header.l2_entries() - l2_index as u64) as usize;
        let l2 = self.l2_offset(m, l1_index)?;
        if l2 != 0 {
            // One cache lookup: the leading clusters that are COPIED and contiguous.
            let table = self.co_l2_table(m, l2)?;
            let first = get_u64(table, l2_index);
            let host = first & OFFSET_MASK;
            let mut n = 0;
            while n < max {
                let e = get_u64(table, l2_index + n);
                if !is_copied_data(e) || e & OFFSET_MASK != host + n as u64 * cs {
                    break;
                }
                n += 1;
            }
            if n > 0 {
                let bytes = (n as u64 * cs - offset % cs).min(len);
                self.check_host_cluster(host, "data cluster")?;
                self.check_host_cluster(host + (n as u64 - 1) * cs, "data cluster")?;
                self.check_no_overlap(m, host, n as u64 * cs, "a data cluster")?;
                self.check_no_table_overlap(m, host, n as u64 * cs, "a data cluster")?;
                return Ok(WritePlan::InPlace {
                    host: host + offset % cs,
                    len: bytes,
                });
            }
        }
        let l2 = self.co_l2_for_write(m, l1_index)?;
        let table = self.co_l2_table(m, l2)?;
        let mut old = Vec::new();
        while old.len() < max {
            let e = get_u64(table, l2_index + old.len());
            if is_copied_data(e) {
                break;
            }
            old.push(e);
        }
        for &e in &old {
            self.decode_l2_entry(e)?; // a bad entry fails before anything is allocated
        }
        let host = self.co_alloc_clusters(m, old.len() as u64)?;
        let bytes = old.len() as u64 * cs;
        if let Err(e) = self
            .check_no_overlap(m, host, bytes, "new data clusters")
            .and_then(|()| self.check_no_table_overlap(m, host, bytes, "new data clusters"))
        {
            self.co_free_quietly(m, host, old.len() as u64);
            return Err(e);
        }
        Ok(WritePlan::Alloc(Alloc {
            guest: offset - offset % cs,
            host,
            old,
        }))
    }

    /// Links the data clusters of `a` (written by now) into the L2 table in the cache and
    /// returns the write that puts them in the file, for the caller to issue after releasing
    /// the lock ([`Qcow2Driver::co_link_unlocked`]). The table stays pinned in the cache until
    /// then. Not for O_DIRECT files: their writes are whole sectors, read-modify-write, and two
    /// links into one sector must not overlap.
    pub(super) fn co_link_in_cache(&self, m: &mut Meta, a: &Alloc) -> Result<L2Write> {
        let cs = self.cluster_size();
        let (l1_index, l2_index) = self.l1_l2_index(a.guest);
        let l2 = self.l2_offset(m, l1_index)?;
        let table = self.co_l2_table(m, l2)?;
        let n = a.old.len();
        for i in 0..n {
            set_u64(table, l2_index + i, (a.host + i as u64 * cs) | OFLAG_COPIED);
        }
        let bytes = table[l2_index * 8..(l2_index + n) * 8].to_vec();
        let i = m.l2_cache.find(l2).expect("just used");
        Ok(L2Write {
            l2,
            first: l2_index,
            bytes,
            _pin: m.l2_cache.pin(i),
        })
    }

    /// Puts a [`Self::co_link_in_cache`] change in the file, without the lock: concurrent
    /// links write disjoint entries (each request holds a claim on its clusters), and the
    /// pinned table is not reloaded from the file meanwhile. Then, under the lock, drops the
    /// references of the replaced entries.
    ///
    /// If the write failed, part of it may have landed: the new clusters are leaked, and the
    /// cached entries are read back from the file, so that the cache says what the file says
    /// (a later write must not go to a cluster the file no longer maps there). If even that
    /// read fails, the image is marked corrupt: its metadata is unknown.
    pub(super) fn co_link_unlocked(&self, a: &Alloc, w: L2Write) -> Result<()> {
        let at = w.l2 + w.first as u64 * 8;
        let res = self.co_write_meta(at, &w.bytes);
        if res.is_ok() && a.old.iter().all(|&e| e == 0) {
            return Ok(()); // nothing to free: no need for the lock
        }
        let mut m = self.meta.co_lock();
        if let Err(e) = res {
            self.leak_after_failed_link(a.host, a.old.len() as u64, &e);
            // Our pin (in `w`) keeps the table cached: its failed range is read back.
            return Err(self.co_resync_l2_entries(&mut m, w.l2, w.first, w.bytes.len() / 8, e));
        }
        for &e in &a.old {
            self.defer_free_entry(&mut m, e);
        }
        Ok(())
    }

    /// Links the data clusters of `a` (written by now) into the L2 table, then drops the
    /// references of the entries they replace, all under the lock (O_DIRECT files).
    /// QEMU: `qcow2_alloc_cluster_link_l2()`.
    pub(super) fn co_link(&self, m: &mut Meta, a: &Alloc) -> Result<()> {
        let cs = self.cluster_size();
        let (l1_index, l2_index) = self.l1_l2_index(a.guest);
        // Our claim on the range kept everyone else off these entries, and the table is COPIED,
        // so nobody moved it either.
        let l2 = self.l2_offset(m, l1_index)?;
        let entries: Vec<u64> = (0..a.old.len() as u64)
            .map(|i| (a.host + i * cs) | OFLAG_COPIED)
            .collect();
        self.co_set_l2_entries(m, l2, l2_index, &entries)?;
        for &e in &a.old {
            self.defer_free_entry(m, e);
        }
        Ok(())
    }

    /// Makes `n` whole clusters from guest `offset` (cluster aligned, one L2 table) read as
    /// zeros: v3 zero entries (keeping a COPIED allocation unless `unmap`), v2 unallocated
    /// entries (only correct without a backing file; the caller makes sure). Dropped
    /// references are released after the L2 write. QEMU: `zero_in_l2_slice()`,
    /// `discard_in_l2_slice()`.
    pub(super) fn co_zero_clusters(
        &self,
        m: &mut Meta,
        offset: u64,
        n: usize,
        unmap: bool,
    ) -> Result<()> {
        let (l1_index, l2_index) = self.l1_l2_index(offset);
        let v3 = self.header.version >= 3;
        if !v3 && self.l2_offset(m, l1_index)? == 0 {
            return Ok(()); // already unallocated
        }
        let l2 = self.co_l2_for_write(m, l1_index)?;
        let table = self.co_l2_table(m, l2)?;
        let old: Vec<u64> = (0..n).map(|i| get_u64(table, l2_index + i)).collect();
        let mut new = Vec::with_capacity(n);
        let mut release = Vec::new();
        for &e in &old {
            self.decode_l2_entry(e)?;
            let keep = !unmap && is_copied_data(e);
            let target = match (v3, keep) {
                (true, true) => e | OFLAG_ZERO,
                (true, false) => OFLAG_ZERO,
                (false, _) => 0,
            };
            let had_cluster = e & OFFSET_MASK != 0 || e & OFLAG_COMPRESSED != 0;
            if target != e && target & OFFSET_MASK == 0 && had_cluster {
                release.push(e);
            }
            new.push(target);
        }
        if new != old {
            self.co_set_l2_entries(m, l2, l2_index, &new)?;
        }
        for e in release {
            self.defer_free_entry(m, e);
        }
        Ok(())
    }
}
