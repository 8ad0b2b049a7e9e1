//! Repairing the refcounts of a dirty image when it is opened for writing.
//!
//! QEMU: `block/qcow2-refcount.c` (`qcow2_check_refcounts()`, `calculate_refcounts()`,
//! `check_oflag_copied()`, `rebuild_refcount_structure()`), run by `qcow2_do_open()` when the
//! dirty bit is set. The format asks for it (`docs/interop/qcow2.txt`, incompatible bit 0: "make
//! sure to scan L1/L2 tables to repair refcounts before accessing the image").
//!
//! A writer with lazy refcounts (QEMU's `lazy_refcounts=on`) sets the dirty bit and writes
//! refcount updates late; if it crashes, the refcounts on disk may be too low (a referenced
//! cluster that looks free: the next allocation would overwrite it) or too high (leaks). We never
//! set the bit. When a writable open finds it, [`Qcow2Driver::co_repair_dirty`]:
//!
//! 1. counts in memory every reference to every host cluster: the header, the L1 tables (active
//!    and of each internal snapshot), the L2 tables they point to, the data and compressed
//!    clusters those point to, and the snapshot table — all but the refcount structures;
//! 2. writes a complete new refcount structure (the blocks, then the table) after the end of
//!    the file, flushes, and points the header at it in one 12-byte write (the old table and
//!    blocks become free clusters);
//! 3. makes the COPIED flags of the active tables say exactly "count is 1" (writes trust them to
//!    overwrite a cluster in place);
//! 4. clears the dirty bit.
//!
//! Each step is flushed before the next, so a crash before step 4 leaves the image dirty and the
//! next writable open repairs it again from scratch. QEMU corrects the counts in place and
//! rebuilds the structure only when it is broken; always rebuilding is simpler (no refcount
//! block to allocate by counts that are wrong) and costs a few clusters at the end of the file.
//! The price: the file must be able to grow, so a dirty qcow2 on a block device is refused
//! (QEMU's rebuild puts the structure in free clusters instead).
//!
//! Anything else found inconsistent — an entry that points outside the file or is misaligned,
//! snapshot tables that run past its end or overlap, a cluster with more than 65535 references,
//! more clusters than we count in memory ([`MAX_CLUSTERS`]) — refuses the open without writing
//! anything (`qemu-img check -r all` repairs more). So does a dirty image with bitmaps, whose
//! clusters this driver does not track.

use super::cache::{decode_table, get_u64, set_u16, set_u64};
use super::header::{self, MAX_L1_BYTES};
use super::refcount::MAX_REFTABLE_BYTES;
use super::{snapshot, Qcow2Driver, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::{BlockError, Result};

/// The most host clusters counted (2 bytes each in memory): 8 TiB of 64 KiB clusters, 64 GiB
/// of 512-byte ones. The refcount table covering them stays within [`MAX_REFTABLE_BYTES`].
const MAX_CLUSTERS: u64 = 1 << 27;

fn unrepairable(why: String) -> BlockError {
    BlockError::Corrupt(format!(
        "qcow2: the image is dirty and its refcounts cannot be rebuilt: {why}; repair it with \
         'qemu-img check -r all', or open it read-only"
    ))
}

/// References per host cluster, as the tables say.
struct Counts {
    cluster_size: u64,
    file_len: u64,
    counts: Vec<u16>,
}

impl Counts {
    /// Refuses (instead of aborting on a failed allocation) a file with too many clusters.
    fn new(cluster_size: u64, file_len: u64) -> Result<Counts> {
        let mut c = Counts {
            cluster_size,
            file_len,
            counts: Vec::new(),
        };
        c.grow(file_len.div_ceil(cluster_size))?;
        Ok(c)
    }

    /// Makes room for counting `clusters` clusters.
    fn grow(&mut self, clusters: u64) -> Result<()> {
        let too_many = || unrepairable(format!("more than {MAX_CLUSTERS} clusters to count"));
        if clusters > MAX_CLUSTERS {
            return Err(too_many());
        }
        let more = (clusters as usize).saturating_sub(self.counts.len());
        self.counts
            .try_reserve_exact(more)
            .map_err(|_| too_many())?;
        self.counts.resize(self.counts.len() + more, 0);
        Ok(())
    }

    fn get(&self, cluster: u64) -> u16 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }

    /// Checks that `what` at `offset` (a table or data cluster) is cluster aligned and starts
    /// inside the file.
    fn check_cluster(&self, offset: u64, what: &str) -> Result<()> {
        if !offset.is_multiple_of(self.cluster_size) || offset >= self.file_len {
            return Err(unrepairable(format!(
                "{what} at {offset:#x} is misaligned or not inside the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(())
    }

    /// Adds one reference to every cluster `[offset, offset + len)` touches.
    fn add(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        self.grow(last + 1)?;
        for c in first..=last {
            let n = &mut self.counts[c as usize];
            *n = n.checked_add(1).ok_or_else(|| {
                unrepairable(format!("cluster {:#x} has over 65535 references", c * cs))
            })?;
        }
        Ok(())
    }
}

impl Qcow2Driver {
    /// Steps 1–4 of the module doc; a writable open calls it before loading the refcount table,
    /// and goes on with the header updated (new refcount table, dirty bit clear).
    pub(super) fn co_repair_dirty(&mut self) -> Result<()> {
        if self.header.has_bitmaps {
            return Err(BlockError::Invalid(
                "qcow2: the image is dirty and has bitmaps, which this driver does not track; \
                 repair it with 'qemu-img check -r all', or open it read-only"
                    .into(),
            ));
        }
        log::warn!("qcow2: the image is dirty (refcounts may be stale): rebuilding them");
        let cs = self.cluster_size();
        let file_len = self.host_len.load(std::sync::atomic::Ordering::Relaxed);
        let mut counts = Counts::new(cs, file_len)?;
        counts.add(0, cs)?; // the header and its extensions
        let l1 = self.meta.co_lock().l1.clone();
        counts.add(self.header.l1_table_offset, l1.len() as u64 * 8)?;
        self.co_count_l1(&mut counts, &l1)?;
        // Snapshot L1 tables do not overlap: all of them fit in the file (this bounds the work
        // a crafted table can ask for).
        let mut l1_bytes = 0u64;
        for (offset, entries) in self.co_count_snapshot_table(&mut counts)? {
            let bytes = u64::from(entries) * 8;
            l1_bytes += bytes;
            if bytes > MAX_L1_BYTES || l1_bytes > file_len {
                return Err(unrepairable(format!(
                    "a snapshot's L1 table of {entries} entries is too big or overlaps others"
                )));
            }
            if bytes > 0 {
                counts.check_cluster(offset, "a snapshot's L1 table")?;
                if offset + bytes > file_len {
                    return Err(unrepairable(format!(
                        "a snapshot's L1 table at {offset:#x} runs past the end of the file"
                    )));
                }
                counts.add(offset, bytes)?;
                let mut raw = vec![0u8; bytes as usize];
                self.co_read_host(offset, &mut raw)?;
                self.co_count_l1(&mut counts, &decode_table(&raw))?;
            }
        }
        self.co_write_refcount_structure(&mut counts)?;
        self.co_fix_copied(&counts)?;
        let bits = self.header.incompatible_features & !header::INCOMPAT_DIRTY;
        self.co_write_host(header::FIELD_INCOMPATIBLE, &bits.to_be_bytes())?;
        self.co_flush_host()?;
        self.header.incompatible_features = bits;
        log::info!("qcow2: refcounts rebuilt, the dirty bit cleared");
        Ok(())
    }

    /// Counts the L2 tables an L1 table points to and the clusters their entries reference.
    fn co_count_l1(&self, counts: &mut Counts, l1: &[u64]) -> Result<()> {
        let cs = self.cluster_size();
        let mut table = vec![0u8; cs as usize];
        for &l1_entry in l1 {
            let l2 = l1_entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            counts.check_cluster(l2, "an L2 table")?;
            counts.add(l2, cs)?;
            self.co_read_host(l2, &mut table)?;
            for i in 0..self.header.l2_entries() as usize {
                let entry = get_u64(&table, i);
                if entry & OFLAG_COMPRESSED != 0 {
                    let (host, len) = self.compressed_extent(entry);
                    if host >= counts.file_len {
                        return Err(unrepairable(format!(
                            "a compressed cluster at {host:#x} is past the end of the file"
                        )));
                    }
                    counts.add(host, len)?;
                    continue;
                }
                let host = entry & OFFSET_MASK;
                if host != 0 {
                    counts.check_cluster(host, "a data cluster")?;
                    counts.add(host, cs)?;
                }
            }
        }
        Ok(())
    }

    /// Counts the clusters of the snapshot table ([`snapshot::read_table`]) and returns each
    /// snapshot's L1 table (offset, entries).
    fn co_count_snapshot_table(&self, counts: &mut Counts) -> Result<Vec<(u64, u32)>> {
        let start = self.header.snapshots_offset;
        let (entries, end) = snapshot::read_table(
            start,
            self.header.nb_snapshots,
            counts.file_len,
            |pos, buf| self.co_read_host(pos, buf),
        )
        .map_err(|e| match e {
            BlockError::Corrupt(why) => unrepairable(why),
            e => e,
        })?;
        counts.add(start, end - start)?;
        Ok(entries
            .iter()
            .map(|e| (e.l1_table_offset, e.l1_size))
            .collect())
    }

    /// Step 2: new refcount blocks and table after everything counted, then the header.
    fn co_write_refcount_structure(&mut self, counts: &mut Counts) -> Result<()> {
        let cs = self.cluster_size();
        let per_block = cs / 2; // 16-bit refcounts
        let end = counts.counts.len() as u64;
        // The blocks must cover themselves and the table too: grow both until they do.
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let b = (end + blocks + table_clusters).div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(unrepairable(format!(
                "a refcount table of {table_clusters} clusters would be needed"
            )));
        }
        let blocks_at = end * cs;
        let table_at = (end + blocks) * cs;
        counts.add(blocks_at, (blocks + table_clusters) * cs)?;
        // Appended: a file that cannot grow (a block device) cannot be repaired here.
        let appending = |e: BlockError| {
            BlockError::Io(std::io::Error::other(format!(
                "qcow2: cannot append the rebuilt refcount structure at {blocks_at:#x}: {e}"
            )))
        };
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        let mut block = vec![0u8; cs as usize];
        for b in 0..blocks {
            for k in 0..per_block {
                set_u16(&mut block, k as usize, counts.get(b * per_block + k));
            }
            self.co_write_host(blocks_at + b * cs, &block)
                .map_err(appending)?;
            set_u64(&mut table, b as usize, blocks_at + b * cs);
        }
        self.co_write_host(table_at, &table).map_err(appending)?;
        self.co_flush_host()?; // the new structure is durable before the header points to it
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_at.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.co_write_host(header::FIELD_REFCOUNT_TABLE, &fields)?;
        self.co_flush_host()?;
        self.header.refcount_table_offset = table_at;
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(())
    }

    /// Step 3: COPIED set exactly on the active L1 and L2 entries whose cluster has one
    /// reference, and cleared on compressed entries. QEMU: `check_oflag_copied()`.
    fn co_fix_copied(&self, counts: &Counts) -> Result<()> {
        let cs = self.cluster_size();
        let copied = |entry: u64, host: u64| {
            let want = if counts.get(host / cs) == 1 {
                OFLAG_COPIED
            } else {
                0
            };
            (entry & !OFLAG_COPIED) | want
        };
        let l1 = self.meta.co_lock().l1.clone();
        let mut table = vec![0u8; cs as usize];
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2 = l1_entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.co_read_host(l2, &mut table)?;
            let mut changed = false;
            for k in 0..self.header.l2_entries() as usize {
                let entry = get_u64(&table, k);
                let host = entry & OFFSET_MASK;
                let fixed = if entry & OFLAG_COMPRESSED != 0 {
                    entry & !OFLAG_COPIED // never on compressed entries
                } else if host != 0 {
                    copied(entry, host)
                } else {
                    entry
                };
                if fixed != entry {
                    set_u64(&mut table, k, fixed);
                    changed = true;
                }
            }
            if changed {
                self.co_write_host(l2, &table)?;
            }
            let fixed = copied(l1_entry, l2);
            if fixed != l1_entry {
                let at = self.header.l1_table_offset + i as u64 * 8;
                self.co_write_host(at, &fixed.to_be_bytes())?;
                let mut m = self.meta.co_lock();
                m.l1[i] = fixed;
                m.tables_changed();
            }
        }
        self.co_flush_host()
    }
}
