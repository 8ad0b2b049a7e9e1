//! Refcounts: how many references each host cluster has, and allocating and freeing clusters.
//!
//! QEMU: `block/qcow2-refcount.c` (`qcow2_refcount_init()`, `alloc_refcount_block()`,
//! `qcow2_refcount_area()`, `update_refcount()`, `alloc_clusters_noref()`,
//! `qcow2_alloc_clusters()`, `qcow2_free_clusters()`, `qcow2_free_any_cluster()`).
//!
//! The refcount table (loaded whole at a writable open) points to refcount blocks; a block is
//! one cluster of 16-bit big-endian counts (`refcount_order` 4, the only width we write), so it
//! covers `cluster_size / 2` clusters. A zero table entry means "all those clusters are free".
//!
//! * **Allocation** hands out clusters from a *reserve*: a run of free clusters found by a scan
//!   from a hint (the first cluster that may be free; QEMU's `free_cluster_index`), whose
//!   refcounts were written as 1 and flushed — one `fdatasync` per batch — so a caller may
//!   reference what it gets at once. Batches start at 16 MiB worth of clusters and double, up
//!   to 1 GiB worth (at most 32768 clusters, at most an eighth of the virtual size), while no
//!   flush comes: a long sequential copy pays few `fdatasync`s (each one writes back the data
//!   written so far); a flush starts them small again. The reserve survives flushes (the next
//!   allocating write would otherwise pay a reservation and its `fdatasync` after every guest
//!   fsync) and is returned by `close`, so a crash — even right after a flush — leaks at most
//!   one batch (mostly past the old end of the file, where the clusters were never written:
//!   the reservation extends the file over them, as holes, before its `fdatasync`). A
//!   request that does not fit in the rest of the reserve
//!   returns the rest and reserves anew (at least what it needs, in one run: one request's
//!   clusters are contiguous).
//! * **A missing refcount block** for a range is created *inside* that range, at its first
//!   cluster, counting itself (QEMU places self-describing blocks the same way). It is written
//!   before the table entry that points to it.
//! * **A full refcount table** is replaced by a bigger one in a fresh area past everything the
//!   old one covers, together with the refcount blocks describing that area: blocks, then table,
//!   then `fdatasync`, then the header's two fields in one write, then the old table's clusters
//!   are freed. A crash before the header write leaves only unreferenced bytes past the end.
//! * **Freeing** a cluster that something referenced is *deferred* until after the next flush
//!   (see the crash-safety section in `mod.rs`); freeing an allocation nobody referenced (an
//!   error path) is immediate — unless the failed write was the one to reference it (it may
//!   have reached the file): then the allocation is leaked. A cluster whose count reaches zero
//!   is forgotten by the caches (it may come back as anything) and becomes the hint if it is
//!   below it. Freed clusters are not discarded in the file (QEMU's `pass-discard-*` options default to off for most cases).

use std::sync::atomic::Ordering;

use super::cache::{decode_table, encode_table, get_u16, set_u16, TableCache};
use super::{header, Meta, Qcow2Driver, OFFSET_MASK, OFLAG_COMPRESSED};
use crate::{BlockError, Result};

/// Refcount table entry: bits 9..=63 are the block's host offset. QEMU: `REFT_OFFSET_MASK`.
pub(super) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// The largest refcount table we load or grow to (QEMU: `QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
pub(super) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must fit in an L2 entry's offset field.
const MAX_HOST_OFFSET: u64 = OFFSET_MASK;

/// The refcount state of a writable image (inside the metadata lock).
pub(crate) struct Refcounts {
    /// The refcount table, decoded (raw entries).
    pub(super) table: Vec<u64>,
    pub(super) table_offset: u64,
    pub(super) table_clusters: u64,
    /// Refcount blocks by host offset, raw bytes.
    cache: TableCache,
    /// Every cluster below this index is in use. QEMU: `free_cluster_index`.
    free_hint: u64,
    /// Reserved clusters: (first index, count), refcount 1 and durable, not yet referenced.
    pool: (u64, u64),
    /// Clusters the next reservation asks for (doubles up to a cap; reset by a flush).
    batch: u64,
    /// Dropped references (host offset, clusters), released after the next flush.
    pending: Vec<(u64, u64)>,
    /// Nothing was allocated or freed since the last successful flush began: dropping the
    /// driver then returns the reserve, as `close` does (see `Qcow2Driver`'s `Drop`).
    idle_since_flush: bool,
}

/// Release deferred frees (with a flush) once this many have piled up between flushes.
const MAX_PENDING_FREES: usize = 1024;

/// A run of free clusters never spans a whole refcount block's range: the scan puts a missing
/// block at the first cluster of its range, which ends the run there. So a request for that
/// many contiguous clusters (a big L1 table with small clusters: above about 510 MiB with
/// 512-byte clusters, 8 GiB with 1 KiB) would scan the whole file space; it is refused.
#[cold]
fn too_many_contiguous(n: u64, cs: u64) -> BlockError {
    BlockError::Invalid(format!(
        "qcow2: cannot allocate {n} contiguous clusters of {cs} bytes (at most {} are \
         supported; use bigger clusters)",
        cs / 2 - 1
    ))
}

fn rc(m: &mut Meta) -> Result<&mut Refcounts> {
    m.rc.as_mut().ok_or(BlockError::ReadOnly)
}

impl Qcow2Driver {
    /// Clusters covered by one refcount block.
    fn refblock_entries(&self) -> u64 {
        self.cluster_size() / 2
    }

    /// Reads and checks the refcount table at open. QEMU: `qcow2_refcount_init()`.
    pub(super) fn load_refcount_table(&self, cache_tables: usize) -> Result<Refcounts> {
        let cs = self.cluster_size();
        let offset = self.header.refcount_table_offset;
        let clusters = u64::from(self.header.refcount_table_clusters);
        let bytes = clusters * cs;
        let file_len = self.host_len.load(Ordering::Relaxed);
        let corrupt = |why: String| BlockError::Corrupt(format!("qcow2 header: {why}"));
        if clusters == 0 || bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {clusters} clusters (at most {MAX_REFTABLE_BYTES} bytes)"
            )));
        }
        if offset == 0
            || !offset.is_multiple_of(cs)
            || !matches!(offset.checked_add(bytes), Some(e) if e <= file_len)
        {
            return Err(corrupt(format!(
                "refcount table ({bytes} bytes at {offset:#x}) is misaligned or not inside the file"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.co_read_host(offset, &mut raw)?;
        Ok(Refcounts {
            table: decode_table(&raw),
            table_offset: offset,
            table_clusters: clusters,
            cache: TableCache::new(cache_tables),
            free_hint: 0,
            pool: (0, 0),
            batch: 0,
            pending: Vec::new(),
            idle_since_flush: false,
        })
    }

    /// The host offset of refcount block `index`, if allocated (checked).
    fn refblock_offset(&self, m: &mut Meta, index: u64) -> Result<Option<u64>> {
        let entry = rc(m)?.table.get(index as usize).copied().unwrap_or(0);
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.check_host_cluster(off, "refcount block")?;
        self.check_no_overlap(m, off, self.cluster_size(), "a refcount block")?;
        Ok(Some(off))
    }

    /// The refcount block at `off`, from the cache or the file.
    fn co_refblock<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut [u8]> {
        if let Some(i) = rc(m)?.cache.find(off) {
            return Ok(rc(m)?.cache.at(i));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.co_read_host(off, &mut raw)?;
        Ok(rc(m)?.cache.insert(off, raw.into()))
    }

    /// The refcount block for block index `index`, created if missing (growing the table if
    /// it is too short). QEMU: `alloc_refcount_block()`.
    fn co_ensure_refblock(&self, m: &mut Meta, index: u64) -> Result<u64> {
        if index >= rc(m)?.table.len() as u64 {
            self.co_grow_refcount_table(m, index)?;
        }
        if let Some(off) = self.refblock_offset(m, index)? {
            return Ok(off);
        }
        // Every cluster of the range is free (no block): put the block at the first one.
        let cs = self.cluster_size();
        let off = index * self.refblock_entries() * cs;
        if off >= MAX_HOST_OFFSET {
            return Err(BlockError::Invalid("qcow2: the image file is full".into()));
        }
        // A range without a block cannot hold metadata: if it does, the table is corrupt.
        self.check_no_overlap(m, off, cs, "a new refcount block")?;
        self.check_no_table_overlap(m, off, cs, "a new refcount block")?;
        self.check_not_pinned(m, off, "a new refcount block")?;
        let mut block = vec![0u8; cs as usize];
        set_u16(&mut block, 0, 1);
        self.co_write_meta(off, &block)?;
        self.co_flush_host()?; // the block is durable before the table points to it
        let table_offset = rc(m)?.table_offset;
        self.co_write_meta(table_offset + index * 8, &off.to_be_bytes())?;
        m.l2_cache.forget(off);
        let rc = rc(m)?;
        rc.table[index as usize] = off;
        rc.cache.insert(off, block.into());
        m.tables_changed();
        Ok(off)
    }

    /// Replaces the refcount table by a bigger one covering block index `need`; see the
    /// module doc for the layout and order. QEMU: `qcow2_refcount_area()`.
    #[cold]
    fn co_grow_refcount_table(&self, m: &mut Meta, need: u64) -> Result<()> {
        let cs = self.cluster_size();
        let epb = self.refblock_entries();
        let (old_len, old_offset, old_clusters) = {
            let rc = rc(m)?;
            (rc.table.len() as u64, rc.table_offset, rc.table_clusters)
        };
        let host_clusters = self.host_len.load(Ordering::Relaxed).div_ceil(cs);
        // The new area starts past everything the old table covers and the file, on a block
        // boundary, so that new blocks (at its start) describe the area alone.
        let area = (old_len * epb).max(host_clusters.div_ceil(epb) * epb);
        let mut table_clusters = old_clusters.max(1);
        let blocks = loop {
            let mut blocks = 1;
            while blocks * epb < blocks + table_clusters {
                blocks += 1;
            }
            let entries = (need + 1).max(area / epb + blocks).max(old_len * 2);
            let needed = (entries * 8).div_ceil(cs);
            if needed <= table_clusters {
                break blocks;
            }
            table_clusters = needed;
        };
        if table_clusters * cs > MAX_REFTABLE_BYTES
            || (area + blocks + table_clusters) * cs >= MAX_HOST_OFFSET
        {
            return Err(BlockError::Invalid(
                "qcow2: the image file would exceed the largest refcount table".into(),
            ));
        }
        let area_end = area + blocks + table_clusters;
        let mut new_blocks = Vec::new();
        for j in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            let first = area + j * epb;
            for c in first..area_end.min(first + epb) {
                set_u16(&mut block, (c - first) as usize, 1);
            }
            self.co_write_meta((area + j) * cs, &block)?;
            new_blocks.push(((area + j) * cs, block.into_boxed_slice()));
        }
        let mut table = rc(m)?.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for j in 0..blocks {
            table[(area / epb + j) as usize] = (area + j) * cs;
        }
        let raw = encode_table(&table, (table_clusters * cs) as usize);
        let table_offset = (area + blocks) * cs;
        self.co_write_meta(table_offset, &raw)?;
        self.co_flush_host()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.co_write_meta(header::FIELD_REFCOUNT_TABLE, &fields)?;
        log::debug!("qcow2: refcount table moved to {table_offset:#x} ({table_clusters} clusters)");
        {
            let rc = rc(m)?;
            rc.table = table;
            rc.table_offset = table_offset;
            rc.table_clusters = table_clusters;
            for (off, block) in new_blocks {
                rc.cache.insert(off, block);
            }
        }
        m.tables_changed();
        self.defer_free(m, old_offset, old_clusters);
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcounts of clusters `[first, first + n)` (indices),
    /// writing each touched block's changed bytes. Within each refcount block, checks every
    /// count before changing any; an error in a later block leaves the earlier ones changed.
    /// QEMU: `update_refcount()`.
    fn co_update_refcounts(&self, m: &mut Meta, first: u64, n: u64, delta: i32) -> Result<()> {
        let epb = self.refblock_entries();
        let cs = self.cluster_size();
        let end = first + n;
        let mut c = first;
        while c < end {
            let index = c / epb;
            let off = if delta > 0 {
                self.co_ensure_refblock(m, index)?
            } else {
                match self.refblock_offset(m, index)? {
                    Some(off) => off,
                    None => {
                        return Err(self.signal_corruption(format!(
                            "freeing cluster {:#x}, which has no refcount block",
                            c * cs
                        )))
                    }
                }
            };
            let stop = end.min((index + 1) * epb);
            let (lo, hi) = ((c % epb) as usize, ((stop - 1) % epb) as usize + 1);
            let block = self.co_refblock(m, off)?;
            let mut bad = None;
            for k in lo..hi {
                let v = i64::from(get_u16(block, k)) + i64::from(delta);
                if !(0..=i64::from(u16::MAX)).contains(&v) {
                    bad = Some((k, v));
                    break;
                }
            }
            if let Some((k, v)) = bad {
                let cluster = (index * epb + k as u64) * cs;
                if v > 0 {
                    return Err(BlockError::Invalid(format!(
                        "qcow2: refcount of cluster {cluster:#x} would overflow"
                    )));
                }
                return Err(self.signal_corruption(format!(
                    "refcount of cluster {cluster:#x} would drop below zero"
                )));
            }
            let mut zeroed = Vec::new();
            for k in lo..hi {
                let v = (i64::from(get_u16(block, k)) + i64::from(delta)) as u16;
                set_u16(block, k, v);
                if v == 0 {
                    zeroed.push(index * epb + k as u64);
                }
            }
            let bytes = block[lo * 2..hi * 2].to_vec();
            if let Err(e) = self.co_write_meta(off + lo as u64 * 2, &bytes) {
                rc(m)?.cache.forget(off);
                return Err(e);
            }
            for z in zeroed {
                self.check_not_pinned(m, z * cs, "a freed cluster")?;
                m.l2_cache.forget(z * cs);
                let rc = rc(m)?;
                rc.cache.forget(z * cs);
                rc.free_hint = rc.free_hint.min(z);
            }
            c = stop;
        }
        Ok(())
    }

    /// The first and the largest reservation, in clusters: 16 MiB and 1 GiB worth, bounded so
    /// that tiny clusters do not mean huge refcount updates, and to an eighth of the virtual
    /// size so that a small image is not stretched by refcount blocks placed far out.
    fn reserve_limits(&self) -> (u64, u64) {
        let cs = self.cluster_size();
        let guest = (self.size.load(Ordering::Acquire) / cs / 8).max(16);
        let first = ((16 << 20) / cs).clamp(16, 4096).min(guest);
        let max = ((1 << 30) / cs).clamp(16, 32768).min(guest).max(first);
        (first, max)
    }

    /// The next run of free clusters at or after index `from`: its start and length (at most
    /// `max`, ending before the first used cluster). Creates missing refcount blocks on the way.
    fn co_next_free_run(&self, m: &mut Meta, from: u64, max: u64) -> Result<(u64, u64)> {
        let epb = self.refblock_entries();
        let cs = self.cluster_size();
        let (mut start, mut len) = (from, 0);
        loop {
            let i = start + len;
            if (i + 1) * cs >= MAX_HOST_OFFSET {
                return Err(BlockError::Invalid("qcow2: the image file is full".into()));
            }
            let index = i / epb;
            let off = self.co_ensure_refblock(m, index)?;
            let block = self.co_refblock(m, off)?;
            for j in i..(index + 1) * epb {
                if get_u16(block, (j % epb) as usize) == 0 {
                    len += 1;
                    if len == max {
                        return Ok((start, len));
                    }
                } else if len > 0 {
                    return Ok((start, len));
                } else {
                    start = j + 1;
                }
            }
        }
    }

    /// Allocates `n` (≥ 1) contiguous clusters with refcount 1; the host offset of the first.
    /// The refcounts are durable before this returns: they come from a reserve that was
    /// written and flushed ahead (one `fdatasync` per batch of about 16 MiB), so a caller may
    /// reference the clusters at once. QEMU: `qcow2_alloc_clusters()`.
    pub(super) fn co_alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        {
            let rc = rc(m)?;
            rc.idle_since_flush = false;
            let (first, count) = rc.pool;
            if count >= n {
                rc.pool = (first + n, count - n);
                return Ok(first * cs);
            }
        }
        if n >= self.refblock_entries() {
            return Err(too_many_contiguous(n, cs));
        }
        // Too few left: give them back (nothing references them) and reserve a new batch.
        let (first, count) = std::mem::take(&mut rc(m)?.pool);
        if count > 0 {
            self.co_free_quietly(m, first * cs, count);
        }
        let (first_batch, max_batch) = self.reserve_limits();
        let batch = rc(m)?.batch.clamp(first_batch, max_batch);
        let want = n.max(batch);
        log::trace!(
            "qcow2: reserving up to {want} clusters: refcounts written and flushed under the \
             metadata lock"
        );
        // The scan may free clusters (a grown refcount table releases the deferred frees once
        // enough piled up), lowering the hint: start it at "nothing freed" and keep the lowest.
        let from = std::mem::replace(&mut rc(m)?.free_hint, u64::MAX);
        let found = self.co_reserve_run(m, from, n, want);
        let rc = rc(m)?;
        let freed = rc.free_hint;
        rc.free_hint = from.min(freed); // what holds if the reservation failed
        let (start, len, first_free) = found?;
        rc.pool = (start + n, len - n);
        // Writing without flushes (a long sequential copy): reserve more, flush less often.
        rc.batch = (batch * 2).min(max_batch);
        // Clusters from `from` to the first free one, and the reserved run, are in use.
        let past = if first_free < start {
            first_free
        } else {
            start + len
        };
        rc.free_hint = freed.min(past);
        Ok(start * cs)
    }

    /// Finds a run of at least `n` (up to `want`) free clusters from index `from`, sets their
    /// refcounts to 1 and flushes. Returns its start and length, and the first free cluster
    /// seen (which may start a shorter run before it).
    fn co_reserve_run(
        &self,
        m: &mut Meta,
        from: u64,
        n: u64,
        want: u64,
    ) -> Result<(u64, u64, u64)> {
        let mut pos = from;
        let mut first_free = None;
        let (start, len) = loop {
            let (s, l) = self.co_next_free_run(m, pos, want)?;
            first_free.get_or_insert(s);
            if l >= n {
                break (s, l);
            }
            pos = s + l;
        };
        self.co_update_refcounts(m, start, len, 1)?;
        let extended = self.co_extend_file((start + len) * self.cluster_size());
        if let Err(e) = extended.and_then(|()| self.co_flush_host()) {
            self.co_free_quietly(m, start * self.cluster_size(), len);
            return Err(e);
        }
        Ok((start, len, first_free.unwrap_or(start)))
    }

    /// Drops one reference of each of the `n` clusters at host offset `host`.
    /// QEMU: `qcow2_free_clusters()`.
    pub(super) fn co_free_clusters(&self, m: &mut Meta, host: u64, n: u64) -> Result<()> {
        let cs = self.cluster_size();
        self.co_update_refcounts(m, host / cs, n, -1)
    }

    /// Frees clusters that nothing references (an allocation that was not used after all),
    /// at once. A failure can only leak: logged, not returned.
    pub(super) fn co_free_quietly(&self, m: &mut Meta, host: u64, n: u64) {
        if let Err(e) = self.co_free_clusters(m, host, n) {
            log::warn!("qcow2: cannot free {n} cluster(s) at {host:#x} (leaked): {e}");
        }
    }

    /// Gives up on `n` new clusters at `host` after the write that was to reference them
    /// failed: it may have reached the file (a failed `pwrite` can be partial, or complete and
    /// still report an error), so they may be referenced now — freeing them, at once or after
    /// a flush, could leave a referenced cluster free. They stay allocated: a leak at worst,
    /// which `qemu-img check -r leaks` repairs.
    #[cold]
    pub(super) fn leak_after_failed_link(&self, host: u64, n: u64, e: &BlockError) {
        log::warn!("qcow2: {n} cluster(s) at {host:#x} leaked: linking them failed: {e}");
    }

    /// Drops a reference that was just removed from the L1/L2 tables or the header: the
    /// decrement waits for the next flush, so that the unlinking write is durable before the
    /// count drops (else a power failure could leave a referenced cluster free).
    pub(super) fn defer_free(&self, m: &mut Meta, host: u64, n: u64) {
        let Some(rc) = m.rc.as_mut() else {
            return;
        };
        rc.pending.push((host, n));
        rc.idle_since_flush = false;
        if rc.pending.len() >= MAX_PENDING_FREES {
            if let Err(e) = self.co_release_locked(m) {
                log::warn!("qcow2: cannot release freed clusters yet: {e}");
            }
        }
    }

    /// Drops the reference an L2 entry held (deferred, see [`Self::defer_free`]): its data
    /// cluster, or every cluster a compressed cluster's bytes touch.
    /// QEMU: `qcow2_free_any_cluster()`.
    pub(super) fn defer_free_entry(&self, m: &mut Meta, entry: u64) {
        let cs = self.cluster_size();
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.compressed_extent(entry);
            let start = host & !511;
            let end = host + len;
            let first = start / cs;
            let n = (end - 1) / cs - first + 1;
            self.defer_free(m, first * cs, n);
        } else if entry & OFFSET_MASK != 0 {
            self.defer_free(m, entry & OFFSET_MASK, 1);
        }
    }

    /// Flushes the file with the lock held, then applies the deferred frees and flushes again.
    /// For a pile of deferred frees in the middle of a request; `co_flush` does the same
    /// without holding the lock across the `fdatasync`s.
    pub(super) fn co_release_locked(&self, m: &mut Meta) -> Result<()> {
        self.co_flush_host()?;
        let pending = self.take_pending(m);
        if self.co_apply_frees(m, pending) {
            self.co_flush_host()?;
        }
        Ok(())
    }

    /// Takes the deferred frees, to be applied after a flush that *starts* after this (the
    /// writes that dropped their references have completed). Nothing is released once the
    /// image is known to be corrupt (leaks are safer). Marks the refcounts idle: any
    /// allocation or deferred free before the flush completes clears it.
    pub(super) fn take_pending(&self, m: &mut Meta) -> Vec<(u64, u64)> {
        match m.rc.as_mut() {
            Some(rc) if !self.is_corrupt() => {
                rc.idle_since_flush = true;
                std::mem::take(&mut rc.pending)
            }
            _ => Vec::new(),
        }
    }

    /// Puts back frees taken by [`Self::take_pending`] when the flush failed.
    pub(super) fn untake_pending(&self, m: &mut Meta, mut pending: Vec<(u64, u64)>) {
        if let Some(rc) = m.rc.as_mut() {
            rc.idle_since_flush = false;
            rc.pending.append(&mut pending);
        }
    }

    /// Applies frees taken by [`Self::take_pending`], once the flush that followed completed.
    /// Resets the reservation size (a flush came). Returns whether anything was freed.
    pub(super) fn co_apply_frees(&self, m: &mut Meta, pending: Vec<(u64, u64)>) -> bool {
        if let Some(rc) = m.rc.as_mut() {
            rc.batch = 0;
        }
        let freed = !pending.is_empty();
        for (host, n) in pending {
            self.co_free_quietly(m, host, n);
        }
        freed
    }

    /// Returns the reserved clusters (nothing references them); `close` calls it after the
    /// final flush. Returns whether there were any (then the caller flushes).
    pub(super) fn co_return_reserve(&self, m: &mut Meta) -> bool {
        let Some(rc) = m.rc.as_mut() else {
            return false;
        };
        let (first, count) = std::mem::take(&mut rc.pool);
        if count == 0 || self.is_corrupt() {
            return false;
        }
        self.co_free_quietly(m, first * self.cluster_size(), count);
        true
    }

    /// Whether nothing was allocated or freed since the last successful flush.
    pub(super) fn idle_since_flush(&self, m: &Meta) -> bool {
        m.rc.as_ref().is_some_and(|rc| rc.idle_since_flush)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{test_image::tiny_image, Qcow2Driver};
    use super::MAX_PENDING_FREES;
    use crate::{FileDriver, FileOptions};

    /// A refcount table growth inside an allocation releases the deferred frees once 1024
    /// piled up; the allocation must not then raise the hint above the clusters they freed
    /// (every cluster below the hint is in use).
    #[test]
    fn frees_during_an_allocation_keep_the_hint_low() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.qcow2");
        // 512-byte clusters: the one-cluster refcount table covers 8 MiB of file.
        tiny_image(&path, 9, 1 << 20);
        let file = FileDriver::open(&path, &FileOptions::default()).expect("open");
        let d = Qcow2Driver::open(Arc::new(file)).expect("qcow2");
        let res = runtime::spawn(move || {
            let cs = d.cluster_size();
            let mut m = d.meta.co_lock();
            let freed: Vec<u64> = (0..MAX_PENDING_FREES - 1)
                .map(|_| d.co_alloc_clusters(&mut m, 1).expect("alloc"))
                .collect();
            for &host in &freed {
                d.defer_free(&mut m, host, 1);
            }
            let lowest = freed.iter().min().copied().unwrap_or(0) / cs;
            let table_len = |m: &super::Meta| m.rc.as_ref().map_or(0, |rc| rc.table.len());
            let before = table_len(&m);
            while table_len(&m) == before {
                d.co_alloc_clusters(&mut m, 1).expect("alloc");
            }
            let rc = m.rc.as_ref().expect("writable");
            assert!(rc.pending.is_empty(), "the growth released the frees");
            (rc.free_hint, lowest)
        })
        .join();
        match res {
            Ok((hint, lowest)) => assert!(hint <= lowest, "hint {hint} above freed {lowest}"),
            Err(_) => panic!("the coroutine panicked"),
        }
    }
}
