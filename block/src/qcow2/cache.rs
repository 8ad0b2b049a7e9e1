//! The metadata table cache: a small LRU of whole L2 tables or refcount blocks, keyed by their
//! host offset, kept as the raw big-endian bytes of the cluster.
//!
//! QEMU: `block/qcow2-cache.c` (`Qcow2Cache`, `qcow2_cache_get()`, `qcow2_cache_put()`).
//!
//! The cache is **write-through**: whoever changes entries of a cached table writes the changed
//! bytes to the file at once (`Qcow2Driver::co_set_l2_entries` in `cluster.rs`, the refcount
//! updates in `refcount.rs`), so a cached table is never dirty and eviction never does I/O.
//! QEMU's cache is write-back and flushes tables in dependency order (refcount blocks before
//! the L2 tables that need them); write-through gets the same order for free — each metadata
//! write completes before the next one is issued — at the price of a few small `pwrite`s per
//! allocating request, which land in the page cache.
//! The flushes that make the order hold against power failure are placed by the callers
//! (cluster reservation, new tables, deferred frees: see the crash-safety section in
//! `mod.rs`). Why not write-back: it is simpler to reason about — after a SIGKILL the file has
//! every metadata update that preceded it — and a 1 MiB write costs two small metadata writes
//! (refcounts are reserved in batches, so usually just the L2 entries), next to the data.
//!
//! One exception keeps the lock short: linking new data clusters into an L2 table changes the
//! cached entries under the lock and writes their bytes after releasing it
//! (`Qcow2Driver::co_link_unlocked` in `cluster.rs`). A [`Pin`] keeps that table in the cache
//! until the write is done, so nobody reloads it from the file in between and loses the change.
//! For the same reason a failed write into a pinned table does not drop the table, as it does
//! an unpinned one: it reads the failed range back from the file
//! (`Qcow2Driver::co_resync_l2_entries`), and a cluster freed while its table is pinned means
//! the refcounts are corrupt (`Qcow2Driver::check_not_pinned`).
//!
//! The cache lives inside the driver's metadata `CoMutex`, so it needs no lock of its own.

use std::sync::Arc;

/// An LRU of tables; the most recently used is last.
pub(super) struct TableCache {
    capacity: usize,
    tables: Vec<Entry>,
}

struct Entry {
    offset: u64,
    table: Box<[u8]>,
    /// Cloned by each [`Pin`]: the table may be evicted only while this is the only handle.
    pins: Arc<()>,
}

impl Entry {
    fn pinned(&self) -> bool {
        // A pin may be dropped on another thread at any moment, never taken without the lock:
        // a stale count only keeps a table one eviction longer (or makes a failed write read
        // its range back where dropping the table would have done).
        Arc::strong_count(&self.pins) > 1
    }
}

/// Keeps a cached table from being evicted while a write of its changed entries is in flight.
/// Taken under the metadata lock, dropped anywhere (no lock needed).
pub(super) struct Pin {
    _handle: Arc<()>,
}

impl TableCache {
    /// A cache of at most `capacity` tables (at least one).
    pub(super) fn new(capacity: usize) -> TableCache {
        TableCache {
            capacity: capacity.max(1),
            tables: Vec::new(),
        }
    }

    /// Where the table at host offset `offset` is, marked most recently used (moved to the end
    /// unless it is there already). Searched from the most recent end: a request's tables
    /// were usually just used.
    pub(super) fn find(&mut self, offset: u64) -> Option<usize> {
        let i = self.tables.iter().rposition(|e| e.offset == offset)?;
        let last = self.tables.len() - 1;
        if i != last {
            let entry = self.tables.remove(i);
            self.tables.push(entry);
        }
        Some(last)
    }

    /// The table at index `i` of [`Self::find`].
    pub(super) fn at(&mut self, i: usize) -> &mut [u8] {
        &mut self.tables[i].table
    }

    /// Pins the table at index `i` of [`Self::find`].
    pub(super) fn pin(&self, i: usize) -> Pin {
        Pin {
            _handle: Arc::clone(&self.tables[i].pins),
        }
    }

    /// Inserts (or replaces) the table at `offset`, evicting the least recently used one that
    /// is not pinned (with every table pinned, the cache grows past its capacity for a while);
    /// returns it.
    pub(super) fn insert(&mut self, offset: u64, table: Box<[u8]>) -> &mut [u8] {
        self.forget(offset);
        while self.tables.len() >= self.capacity {
            let Some(i) = self.tables.iter().position(|e| !e.pinned()) else {
                break;
            };
            self.tables.remove(i);
        }
        self.tables.push(Entry {
            offset,
            table,
            pins: Arc::new(()),
        });
        let last = self.tables.len() - 1;
        self.at(last)
    }

    /// Whether the table at `offset` is cached and pinned.
    pub(super) fn is_pinned(&self, offset: u64) -> bool {
        self.tables.iter().any(|e| e.offset == offset && e.pinned())
    }

    /// Drops the table at `offset` if cached (its cluster was freed and may be reused as data,
    /// or a write of it failed). The caller makes sure it is not pinned ([`Self::is_pinned`]):
    /// a pinned table holds a change its file copy does not have yet, and reloading the table
    /// would lose it.
    pub(super) fn forget(&mut self, offset: u64) {
        debug_assert!(
            !self.is_pinned(offset),
            "forgetting pinned table {offset:#x}"
        );
        self.tables.retain(|e| e.offset != offset);
    }
}

/// Decodes a table of big-endian `u64` entries (L1, refcount table).
pub(super) fn decode_table(raw: &[u8]) -> Vec<u64> {
    (0..raw.len() / 8).map(|i| get_u64(raw, i)).collect()
}

/// Encodes `entries` as big-endian `u64`s into `bytes` bytes (zero padded).
pub(super) fn encode_table(entries: &[u64], bytes: usize) -> Vec<u8> {
    let mut raw = vec![0u8; bytes];
    for (i, &e) in entries.iter().enumerate() {
        set_u64(&mut raw, i, e);
    }
    raw
}

/// The big-endian `u64` entry `i` of an L1 or L2 table.
pub(super) fn get_u64(table: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = table.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

/// Sets the big-endian `u64` entry `i`.
pub(super) fn set_u64(table: &mut [u8], i: usize, v: u64) {
    if let Some(s) = table.get_mut(i * 8..i * 8 + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// The big-endian `u16` entry `i` of a refcount block (refcount_order 4).
pub(super) fn get_u16(table: &[u8], i: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = table.get(i * 2..i * 2 + 2) {
        b.copy_from_slice(s);
    }
    u16::from_be_bytes(b)
}

/// Sets the big-endian `u16` entry `i`.
pub(super) fn set_u16(table: &mut [u8], i: usize, v: u16) {
    if let Some(s) = table.get_mut(i * 2..i * 2 + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_oldest_and_replaces() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1u8; 8].into());
        c.insert(2, vec![2u8; 8].into());
        assert!(c.find(1).is_some()); // 1 is now the most recent
        c.insert(3, vec![3u8; 8].into());
        assert!(c.find(2).is_none(), "2 was the least recently used");
        c.insert(1, vec![9u8; 8].into());
        assert_eq!(c.find(1).map(|i| c.at(i)[0]), Some(9));
        c.forget(1);
        assert!(c.find(1).is_none());
    }

    #[test]
    fn pinned_tables_are_not_evicted() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1u8; 8].into());
        c.insert(2, vec![2u8; 8].into());
        let i = c.find(1).expect("cached");
        let pin = c.pin(i);
        c.find(2); // 1 is the least recently used, but pinned
        c.insert(3, vec![3u8; 8].into());
        assert!(c.find(1).is_some(), "the pinned table stays");
        assert!(c.find(2).is_none(), "the unpinned one goes");
        let i3 = c.find(3).expect("cached");
        let pin3 = c.pin(i3);
        let i1 = c.find(1).expect("cached");
        let _pin1 = c.pin(i1);
        c.insert(4, vec![4u8; 8].into());
        assert!(
            c.find(1).is_some() && c.find(3).is_some() && c.find(4).is_some(),
            "all pinned: grows"
        );
        drop((pin, pin3));
        c.insert(5, vec![5u8; 8].into());
        assert!(c.find(3).is_none(), "unpinned again: evicted first");
        assert!(c.find(1).is_some(), "still pinned");
    }

    #[test]
    fn find_marks_most_recent() {
        let mut c = TableCache::new(3);
        for o in 1..=3u64 {
            c.insert(o, vec![o as u8; 8].into());
        }
        assert_eq!(c.find(3), Some(2), "already the most recent: stays");
        assert_eq!(c.find(1), Some(2), "moved to the end");
        assert_eq!(c.at(2)[0], 1);
        c.insert(4, vec![4u8; 8].into());
        assert!(c.find(2).is_none(), "2 was the least recently used");
        assert_eq!(c.find(9), None);
    }

    #[test]
    fn entries_are_big_endian() {
        let mut t = vec![0u8; 16];
        set_u64(&mut t, 1, 0x0102_0304_0506_0708);
        assert_eq!(t[8], 1);
        assert_eq!(get_u64(&t, 1), 0x0102_0304_0506_0708);
        set_u16(&mut t, 0, 0xabcd);
        assert_eq!((t[0], t[1]), (0xab, 0xcd));
        assert_eq!(get_u16(&t, 0), 0xabcd);
        assert_eq!(get_u64(&t, 5), 0, "out of range reads zero");
        let raw = encode_table(&[1, 0x0102_0304_0506_0708], 24);
        assert_eq!(raw.len(), 24);
        assert_eq!(decode_table(&raw), [1, 0x0102_0304_0506_0708, 0]);
    }
}
