//! Truncate: growing the virtual size (moving the L1 table to a bigger one when it no longer
//! covers it) and shrinking it when nothing allocated would be lost.
//!
//! QEMU: `block/qcow2.c` `qcow2_co_truncate()`, `block/qcow2-cluster.c` `qcow2_grow_l1_table()`.
//!
//! Growing past the L1 table's coverage: allocate clusters for a bigger table, write the old
//! entries and zeros there, `fdatasync`, then write the header's `l1_size` and
//! `l1_table_offset` (adjacent fields, one write), then the size, then free the old table. A
//! crash before the header write leaks the new table; after it, the bigger table simply covers
//! more than the size. Growing also zeroes the bytes between the old size and the end of its
//! last cluster if that cluster is allocated, so the new range reads as zeros. With a backing
//! file longer than the old size, the new range (up to the backing file's end, from the old
//! size) is zeroed before the new size is published — zero clusters on v3, zero data on v2 —
//! or it would show the backing file's data (after a shrink, too: a shrink keeps unallocated
//! and zero clusters).
//!
//! Shrinking is refused when the image has internal snapshots (as QEMU does). Otherwise it
//! keeps the L1 table (it may cover more than the size) and refuses, with
//! [`BlockError::Invalid`] (EINVAL), when a cluster wholly past the new end still holds data.
//! QEMU discards such clusters instead; refusing is the safer choice for an export, where a
//! stray `truncate -s` would otherwise destroy data.

use std::sync::atomic::Ordering;

use super::cluster::Mapping;
use super::header::{FIELD_L1_SIZE, FIELD_SIZE, MAX_L1_BYTES, SECTOR_SIZE};
use super::{Meta, Qcow2Driver};
use crate::{BlockError, Result};

impl Qcow2Driver {
    /// Changes the virtual size. QEMU: `qcow2_co_truncate()` (`PREALLOC_MODE_OFF`).
    pub(super) fn co_resize(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.is_corrupt() {
            return Err(super::corrupt_refusal("resizing is"));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            // The header would keep the bytes, but every reader (QEMU, and us at the next
            // open) rounds them down to a sector: refuse rather than lose them. QEMU:
            // "The new size must be a multiple of 512".
            return Err(BlockError::Invalid(format!(
                "qcow2: the new size {size} is not a multiple of {SECTOR_SIZE} bytes"
            )));
        }
        // Waits for every write in flight, and keeps new ones out.
        let _claim = self.co_claim(0, u64::MAX - self.cluster_size());
        let old = self.size.load(Ordering::Acquire);
        if size == old {
            return Ok(());
        }
        if size < old {
            if self.header.nb_snapshots > 0 {
                return Err(BlockError::Invalid(
                    "qcow2: cannot shrink an image that has internal snapshots".into(),
                ));
            }
            let mut m = self.meta.co_lock();
            self.co_check_shrink(&mut m, size, old)?;
            self.co_write_meta(FIELD_SIZE, &size.to_be_bytes())?;
            self.size.store(size, Ordering::Release);
            return Ok(());
        }
        let cs = self.cluster_size();
        let per_l2 = cs * self.header.l2_entries();
        let entries = size.div_ceil(per_l2);
        if entries * 8 > MAX_L1_BYTES {
            return Err(BlockError::Invalid(format!(
                "qcow2: {size} bytes needs an L1 table larger than {MAX_L1_BYTES} bytes"
            )));
        }
        {
            let mut m = self.meta.co_lock();
            if entries > m.l1.len() as u64 {
                self.co_grow_l1(&mut m, entries)?;
            }
        }
        // Unallocated clusters read from the backing file: where it is longer than the old
        // size, the new range (and the old last cluster's tail) would show its data. Zero
        // clusters (v3) or zero data (v2) hide it. QEMU: `BDRV_REQ_ZERO_WRITE` from
        // `bdrv_co_truncate()` when the backing file is longer than the old size.
        let zero_end = self.backing_len().div_ceil(cs).saturating_mul(cs).min(size);
        if zero_end > old {
            self.co_zero_claimed(old, zero_end - old, false, size)?;
        } else if !old.is_multiple_of(cs) {
            let allocated = {
                let mut m = self.meta.co_lock();
                !matches!(
                    self.co_lookup_locked(&mut m, old)?,
                    Mapping::Zero | Mapping::Unallocated
                )
            };
            if allocated {
                let n = (cs - old % cs).min(size - old);
                self.co_write_claimed(old, &vec![0u8; n as usize])?;
            }
        }
        self.co_write_meta(FIELD_SIZE, &size.to_be_bytes())?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Refuses a shrink from `old` to `size` that would drop an allocated cluster.
    fn co_check_shrink(&self, m: &mut Meta, size: u64, old: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_l2 = cs * self.header.l2_entries();
        let mut pos = size.div_ceil(cs) * cs;
        while pos < old {
            let (l1_index, _) = self.l1_l2_index(pos);
            if m.l1
                .get(l1_index)
                .is_some_and(|e| e & super::OFFSET_MASK == 0)
            {
                pos = (pos / per_l2 + 1) * per_l2; // a whole unallocated L2 range
                continue;
            }
            let entry = self.co_l2_entry(m, pos)?;
            if matches!(
                self.decode_l2_entry(entry)?,
                Mapping::Data(_) | Mapping::Compressed(..)
            ) {
                return Err(BlockError::Invalid(format!(
                    "qcow2: cannot shrink to {size} bytes: guest offset {pos} still holds data \
                     (discard it first)"
                )));
            }
            pos += cs;
        }
        Ok(())
    }

    /// Moves the L1 table to a new one of `entries` entries. QEMU: `qcow2_grow_l1_table()`.
    #[cold]
    fn co_grow_l1(&self, m: &mut Meta, entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bytes = (entries * 8).div_ceil(cs) * cs;
        let clusters = bytes / cs;
        let raw = super::cache::encode_table(&m.l1, bytes as usize);
        let new = self.co_alloc_clusters(m, clusters)?;
        let res = self
            .co_write_meta(new, &raw)
            .and_then(|()| self.co_flush_host());
        if let Err(e) = res {
            self.co_free_quietly(m, new, clusters);
            return Err(e);
        }
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..].copy_from_slice(&new.to_be_bytes());
        let res = self
            .co_write_meta(FIELD_L1_SIZE, &fields)
            .and_then(|()| self.co_flush_host()); // the new L1 is in place before the size grows
        if let Err(e) = res {
            self.leak_after_failed_link(new, clusters, &e);
            return Err(e);
        }
        let (old_offset, old_len) = (m.l1_offset, m.l1.len() as u64);
        m.l1.resize(entries as usize, 0);
        m.l1_offset = new;
        m.tables_changed();
        if old_len > 0 && old_offset != 0 {
            self.defer_free(m, old_offset, (old_len * 8).div_ceil(cs));
        }
        Ok(())
    }
}
