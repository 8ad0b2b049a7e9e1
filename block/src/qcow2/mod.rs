//! The `qcow2` format driver: reads and writes (v2/v3), internal snapshots left intact.
//!
//! QEMU: `block/qcow2.c` (`qcow2_open()`, `qcow2_co_preadv_part()`, `qcow2_co_pwritev_part()`,
//! `qcow2_co_pwrite_zeroes()`, `qcow2_co_pdiscard()`, `qcow2_co_truncate()`,
//! `qcow2_signal_corruption()`), `block/qcow2-cluster.c` (lookup, allocation, linking:
//! [`cluster`]), `block/qcow2-refcount.c` (refcounts: [`refcount`]), `block/qcow2-cache.c`
//! ([`cache`]); the format is `docs/interop/qcow2.txt`.
//!
//! # Where things live
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` (here) | the driver: open, host I/O, the read path, corruption, the `BlockDriver` glue |
//! | [`header`] | the on-disk header, its validation, the offsets of the fields we rewrite |
//! | [`cluster`] | guest offset → L1 → L2 → [`Mapping`]; L2 allocation and copy-on-write; linking |
//! | [`create`] | creating an empty image (`qemu-img create -f qcow2` defaults) |
//! | [`refcount`] | refcount table and blocks, cluster allocation and freeing |
//! | [`write`](mod@write) | write requests: serialising overlapping ones, copy-on-write, zeroing, discard |
//! | [`resize`] | truncate: growing (and relocating) the L1 table, shrinking when nothing is lost |
//! | [`repair`] | a dirty image's refcounts, rebuilt from the tables at a writable open |
//! | [`snapshot`] | walking the internal snapshot table (for the repair) |
//! | [`cache`] | the write-through LRU of L2 tables and refcount blocks |
//! | `inflate` | decompressing deflate clusters |
//!
//! Compressed clusters (deflate via `miniz_oxide`, zstd via `ruzstd`; see `decompress`) are
//! decompressed one whole cluster per request that touches it.
//!
//! Unallocated clusters read from below through one method, `co_read_below` (the backing
//! chain, zeros past its end or without one); it is also the copy-on-write source of partial
//! cluster writes. `backing` opens the chain and explains the rules.
//!
//! # Locking: plan under the lock, data I/O without it
//!
//! All metadata (the L1 table, the L2 and refcount caches, the refcount table, the list of
//! writes in flight) sits in one [`runtime::CoMutex`], `meta`, as QEMU's `s->lock`. It may be
//! held across *metadata* I/O (an L2 table read on a cache miss, a refcount update), never across
//! guest data I/O: a request takes the lock, turns its range into a plan ([`Mapping`] for reads,
//! `WritePlan` for writes — which may allocate clusters), drops the lock, does the data I/O,
//! and (for an allocating write) takes the lock again to link the new clusters into the L2 table.
//!
//! Two writes whose clusters overlap must not both allocate the same guest cluster, and a write
//! must not overwrite a cluster that a concurrent discard frees: every write, write-zeroes,
//! discard and truncate first *claims* its cluster-aligned guest range in `meta` and waits on a
//! [`runtime::CoQueue`] while it overlaps a claimed one (QEMU: `s->cluster_allocs` and
//! `handle_dependencies()`; we serialise all overlapping writes, not only allocating ones,
//! which is simpler and costs only writes to the same clusters). Reads never wait: a read that
//! races with a write of the same bytes may see old or new data, as on any disk. A read that
//! mapped a cluster just before a copy-on-write or discard released it still reads the old
//! bytes: released clusters are only freed after the next flush (see below), so the cluster is
//! reused only if a flush *and* a new allocation complete before the read is issued — a window
//! QEMU has too; the guest asked for both at once.
//!
//! # Crash safety: the order of metadata writes
//!
//! Caches are write-through ([`cache`]): every metadata write completes before the next
//! dependent one starts. The order, and the `fdatasync` barriers that make it hold against
//! power failure too (a disk may reorder writes between flushes):
//!
//! 1. **refcounts first**: clusters are *reserved* ahead in batches (16 MiB worth, doubling
//!    up to 1 GiB while no flush comes; see [`refcount`]) — their refcounts written as 1, the
//!    file extended to cover them (its last sector written), then one `fdatasync` — and handed
//!    out from the reserve, so a cluster's refcount, and a file long enough to hold it, are
//!    durable before anything references it (without the extension a lost data write past
//!    the end would leave an L2 entry pointing past a shorter file: corruption to
//!    `qemu-img check`). `close` trims the file back to what was written. A new refcount block is
//!    written and flushed before the refcount table points to it; a grown refcount table is
//!    written and flushed before the header does.
//! 2. **then contents**: guest data, or a new L2 table, is written into the new cluster. A new
//!    L2 table is flushed before the L1 entry points to it; a moved L1 table before the header
//!    does, and the header's L1 fields before a bigger size.
//! 3. **then the reference**: the L2 entry (or L1 entry, or header field) is written. Guest data
//!    is *not* flushed before its L2 entry (QEMU does not either): after a power failure an
//!    unflushed write may show a cluster's old bytes, but never breaks the metadata. Bytes
//!    *copied* into a new cluster (copy-on-write of a partial cluster) are: they were durable
//!    in the old cluster, and a power cut must not lose them — one `fdatasync` between the
//!    data write and the L2 entry, skipped when the copy is zeros into a cluster never written
//!    (a hole). QEMU: `qcow2_cache_depends_on_flush()` in `perform_cow()`. The L2
//!    write that links new data clusters is issued after the metadata lock is released (the
//!    entries change in the pinned cached table under it); the request completes — and may
//!    drop the replaced entries' references — only once that write is done.
//! 4. **then the release**: a reference removed from a table (copy-on-write, zeroing,
//!    discard, a moved table) is decremented only after the next flush made the removal
//!    durable: frees are deferred to [`BlockDriver::co_flush`] (or to a flush of their own
//!    once 1024 have piled up).
//!
//! So a crash — SIGKILL, or power failure on a disk that honours `fdatasync` — at any moment
//! leaves an image whose only defects are leaks (`block/tests/qcow2_crash.rs` proves it by
//! replaying every state a power cut could leave, with the `blklogwrites` filter): reserved clusters not used yet, deferred frees
//! not applied, data clusters written but not linked. `qemu-img check` reports them (exit 3)
//! and `-r leaks` repairs them. `co_flush` (a guest's fsync, the export's final flush)
//! additionally applies the frees deferred before it started; it keeps the reserve for the
//! next writes, so a crash after a flush still leaks it. `close` (or dropping the driver right
//! after a flush) returns the reserve, so an image that was flushed and closed checks clean.
//! Writes completed before a flush are durable after it. The `fdatasync` of `co_flush` runs
//! without the metadata lock: requests go on meanwhile, and what they free waits for the next
//! flush.
//!
//! We never set the dirty bit (no lazy refcounts). A writable open of an image that has it set
//! (QEMU with `lazy_refcounts=on` crashed) rebuilds the refcounts from the tables first
//! ([`repair`]); read-only opens need no refcounts and leave it alone. A writable open clears
//! the autoclear feature bits (we do not maintain bitmaps), as QEMU does for features it does
//! not know.
//!
//! # Corruption
//!
//! A metadata entry that points outside the file, is misaligned, or would make us write over
//! the header, the L1 table, the refcount table, an active L2 table or a refcount block (a data
//! entry pointing at a table, or refcounts calling a table's cluster free) fails the request with [`BlockError::Corrupt`] (EIO)
//! and marks the image corrupt (logged once, [`Qcow2Driver::is_corrupt`]). A writable image
//! also gets the header's corrupt bit (v3, as `qcow2_signal_corruption()` does), and from then
//! on every metadata write and every write request is refused; reads keep being served.
//!
//! # Not yet
//!
//! Subclusters, bitmaps, encryption, external data files, refcount widths other than 16 bits
//! for writing, snapshot creation or deletion, shrinking the L1 table, discarding freed clusters
//! in the host file, backing files other than local raw/qcow2 files.

mod backing;
pub mod cache;
pub mod cluster;
pub mod create;
mod decompress;
pub mod header;
mod inflate;
pub mod refcount;
mod repair;
pub mod resize;
pub mod snapshot;
#[cfg(test)]
mod test_image;
pub mod write;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use runtime::{CoMutex, CoQueue};

use crate::backend::{BackendOptions, BlockBackend};
use crate::{BlockDriver, BlockError, BlockStatus, Result};
pub(crate) use backing::{has_protocol, name_error, open_backing, Backing};
pub use backing::{resolve_backing_path, ChainOptions, MAX_CHAIN_DEPTH};
pub use cluster::Mapping;
pub use create::{create_qcow2, create_qcow2_overlay};
pub use header::Header;
use refcount::Refcounts;

/// Bits 9..=55 of an L1 or standard L2 entry: a host offset. QEMU: `L1E_OFFSET_MASK`.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry: the cluster's refcount is exactly 1, it may be written in place.
/// QEMU: `QCOW_OFLAG_COPIED`.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster. QEMU: `QCOW_OFLAG_COMPRESSED`.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry (v3): reads as zeros. QEMU: `QCOW_OFLAG_ZERO`.
const OFLAG_ZERO: u64 = 1;

/// Cache sizes. QEMU: the `l2-cache-size` and `refcount-cache-size` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Bytes of L2 tables to cache (at least one table; at most 64 tables, searched linearly).
    pub l2_cache_bytes: u64,
    /// Bytes of refcount blocks to cache (at least one block, at most 64).
    pub refcount_cache_bytes: u64,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            l2_cache_bytes: 4 << 20,
            refcount_cache_bytes: 1 << 20,
        }
    }
}

/// At most this many tables per cache: the caches are searched linearly.
const MAX_CACHED_TABLES: u64 = 64;

/// Everything behind the metadata lock. QEMU: the parts of `BDRVQcow2State` under `s->lock`.
pub(crate) struct Meta {
    /// The active L1 table, decoded.
    l1: Vec<u64>,
    /// Host offset of the active L1 table.
    l1_offset: u64,
    l2_cache: cache::TableCache,
    /// Refcount state; `None` for a read-only image (refcounts are never read then).
    rc: Option<Refcounts>,
    /// Claimed guest ranges of writes in flight, cluster aligned (see the module doc).
    claims: Vec<(u64, u64)>,
    /// Requests waiting in `claim_waiters` (a released claim wakes them only if any).
    claim_waiters: usize,
    /// Host offsets of the active L2 tables and the refcount blocks, sorted, for
    /// [`Qcow2Driver::check_no_table_overlap`]; `None` after `l1` or the refcount table changed
    /// (rebuilt at the next check: the tables change rarely, writes check often).
    table_index: Option<Vec<u64>>,
}

impl Meta {
    /// Call after changing `l1` or the refcount table.
    fn tables_changed(&mut self) {
        self.table_index = None;
    }

    /// The sorted host offsets of the active L2 tables and the refcount blocks.
    fn table_index(&mut self) -> &[u64] {
        let (l1, rc) = (&self.l1, &self.rc);
        self.table_index.get_or_insert_with(|| {
            let mut v: Vec<u64> = l1.iter().map(|&e| e & OFFSET_MASK).collect();
            if let Some(rc) = rc {
                v.extend(rc.table.iter().map(|&e| e & refcount::REFT_OFFSET_MASK));
            }
            v.retain(|&o| o != 0);
            v.sort_unstable();
            v
        })
    }
}

/// The qcow2 format over a child (the file driver). QEMU: `BDRVQcow2State`.
pub struct Qcow2Driver {
    child: Arc<dyn BlockDriver>,
    /// View of the child that pads unaligned I/O (O_DIRECT); writes beyond its end extend the
    /// file when writable (new clusters go there).
    file: BlockBackend,
    /// The child needs no alignment: talk to it directly (no padding, no growth bookkeeping).
    direct: bool,
    /// Host bytes that may hold data: the file length at open, raised by every write past it.
    /// Relaxed: every reader of a cluster learned of it under `meta`, which orders the update.
    host_len: AtomicU64,
    /// The header as opened (size and table locations live in `size` and `meta`).
    header: Header,
    read_only: bool,
    /// The virtual size. Release/Acquire: a thread that sees a new size sees the L1 table that
    /// covers it (written under `meta` before the store).
    size: AtomicU64,
    meta: CoMutex<Meta>,
    /// Writes waiting for an overlapping claim to go away.
    claim_waiters: CoQueue,
    /// Set once metadata was found inconsistent. Relaxed: a flag checked before writes; the
    /// header write it triggers is ordered by its own I/O.
    corrupt: AtomicBool,
    /// The backing file (`backing.rs`), opened by [`Qcow2Driver::open_chain`].
    backing: Option<backing::Backing>,
}

impl Qcow2Driver {
    /// Opens a qcow2 image over `child` with default cache sizes; writable when the child is.
    /// See [`Qcow2Driver::open_with`].
    pub fn open(child: Arc<dyn BlockDriver>) -> Result<Qcow2Driver> {
        Qcow2Driver::open_with(child, &Qcow2Options::default())
    }

    /// Opens a qcow2 image over `child`: reads and validates the header, loads the L1 table
    /// and, when the child is writable, the refcount table (rebuilt first if the image is dirty;
    /// refcount widths other than 16 bits are refused). Runs its I/O on the calling thread when called
    /// outside a coroutine. Errors say what is wrong or unsupported but do not name the file
    /// (the caller does). An image with a backing file is refused: [`Qcow2Driver::open_chain`]
    /// knows where to look for it. QEMU: `qcow2_open()`.
    pub fn open_with(child: Arc<dyn BlockDriver>, opts: &Qcow2Options) -> Result<Qcow2Driver> {
        let driver = Qcow2Driver::open_node(child, opts)?;
        match &driver.header.backing_file {
            Some(name) => Err(backing::needs_chain(name)),
            None => Ok(driver),
        }
    }

    /// [`Qcow2Driver::open_with`] without looking at the backing file (left unopened).
    fn open_node(child: Arc<dyn BlockDriver>, opts: &Qcow2Options) -> Result<Qcow2Driver> {
        let read_only = child.is_read_only();
        let file = BlockBackend::new(
            child.clone(),
            BackendOptions {
                read_only,
                write_beyond_eof: !read_only,
                ..BackendOptions::default()
            },
        )?;
        let direct = child.request_alignment() <= 1 && child.min_mem_alignment() <= 1;
        let file_len = file.size();
        let mut head = vec![0u8; file_len.min(512) as usize];
        file.co_pread(0, &mut head)?;
        let cluster_bits = header::RawHeader::from_bytes(&head).cluster_bits.get();
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            head = vec![0u8; file_len.min(1 << cluster_bits) as usize];
            file.co_pread(0, &mut head)?;
        }
        let header = Header::parse(&head, file_len)?;
        if !read_only {
            check_writable(&header)?;
        }
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        file.co_pread(header.l1_table_offset, &mut raw_l1)?;
        let l1 = cache::decode_table(&raw_l1);
        let cs = header.cluster_size();
        let tables = |bytes: u64| (bytes / cs).clamp(1, MAX_CACHED_TABLES) as usize;
        let mut driver = Qcow2Driver {
            child,
            file,
            direct,
            host_len: AtomicU64::new(file_len),
            size: AtomicU64::new(header.size),
            read_only,
            meta: CoMutex::new(Meta {
                l1,
                l1_offset: header.l1_table_offset,
                l2_cache: cache::TableCache::new(tables(opts.l2_cache_bytes)),
                rc: None,
                claims: Vec::new(),
                claim_waiters: 0,
                table_index: None,
            }),
            claim_waiters: CoQueue::new(),
            corrupt: AtomicBool::new(false),
            header,
            backing: None,
        };
        if !read_only {
            if driver.header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                driver.co_repair_dirty()?;
            }
            let rc = driver.load_refcount_table(tables(opts.refcount_cache_bytes))?;
            let mut m = driver.meta.co_lock();
            m.rc = Some(rc);
            m.tables_changed();
            drop(m);
            if driver.header.autoclear_features != 0 {
                // Bitmaps and other autoclear features become stale as soon as we write.
                driver.co_write_host(header::FIELD_AUTOCLEAR, &[0u8; 8])?;
            }
        }
        Ok(driver)
    }

    /// The validated header as opened (the size and table locations may have changed since).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether inconsistent metadata was found since open.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Reports corruption once (and, on a writable v3 image, sets the header's corrupt bit) and
    /// returns the error for the request. QEMU: `qcow2_signal_corruption()`.
    #[cold]
    fn signal_corruption(&self, why: String) -> BlockError {
        if !self.corrupt.swap(true, Ordering::Relaxed) {
            log::error!("qcow2: image is corrupt: {why}; further corruption is not reported");
            if !self.read_only && self.header.version >= 3 {
                let bits = self.header.incompatible_features | header::INCOMPAT_CORRUPT;
                if let Err(e) = self.co_write_host(header::FIELD_INCOMPATIBLE, &bits.to_be_bytes())
                {
                    log::error!("qcow2: cannot set the corrupt bit: {e}");
                }
            }
        }
        BlockError::Corrupt(format!("qcow2: {why}"))
    }

    /// Checks that a metadata or data cluster at `offset` is aligned and starts in the file.
    fn check_host_cluster(&self, offset: u64, what: &str) -> Result<()> {
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(
                self.signal_corruption(format!("{what} offset {offset:#x} is not cluster aligned"))
            );
        }
        let len = self.host_len.load(Ordering::Relaxed);
        if offset >= len {
            return Err(self.signal_corruption(format!(
                "{what} offset {offset:#x} is beyond the end of the file ({len} bytes)"
            )));
        }
        Ok(())
    }

    /// Checks that `[host, host+len)`, about to be written as `what`, does not overlap the
    /// header, the L1 table or the refcount table. QEMU: `qcow2_check_metadata_overlap()`
    /// (L2 tables and refcount blocks: [`Qcow2Driver::check_no_table_overlap`]; snapshot tables
    /// are not checked).
    fn check_no_overlap(&self, m: &Meta, host: u64, len: u64, what: &str) -> Result<()> {
        let cs = self.cluster_size();
        let overlaps =
            |start: u64, bytes: u64| bytes > 0 && host < start + bytes && start < host + len;
        let mut hit = overlaps(0, cs).then_some("the header");
        if overlaps(m.l1_offset, m.l1.len() as u64 * 8) {
            hit = Some("the L1 table");
        }
        if let Some(rc) = &m.rc {
            if overlaps(rc.table_offset, rc.table_clusters * cs) {
                hit = Some("the refcount table");
            }
        }
        match hit {
            None => Ok(()),
            Some(t) => {
                Err(self.signal_corruption(format!("{what} at {host:#x} would overwrite {t}")))
            }
        }
    }

    /// Checks that `[host, host+len)`, about to be written as `what` (guest data, or a table
    /// in a newly allocated cluster), is neither an active L2 table nor a refcount block: a
    /// corrupt L2 entry (COPIED set, pointing at a table) or refcounts that call a table's
    /// cluster free would otherwise make the write overwrite metadata. Scans the L1 table and
    /// the refcount table (a few thousand entries for a TiB of 64 KiB clusters), as QEMU's
    /// default `overlap-check=cached` does. QEMU: `QCOW2_OL_ACTIVE_L2`, `QCOW2_OL_REFCOUNT_BLOCK`
    /// in `qcow2_check_metadata_overlap()`.
    fn check_no_table_overlap(&self, m: &mut Meta, host: u64, len: u64, what: &str) -> Result<()> {
        let cs = self.cluster_size();
        // A table at `start` overlaps [host, host + len) if start < host + len and
        // start + cs > host: binary search in the sorted index (rebuilt only after the L1 or
        // refcount table changed), not a scan of both tables on every write.
        let index = m.table_index();
        let first = index.partition_point(|&start| start.saturating_add(cs) <= host);
        let Some(&start) = index.get(first).filter(|&&s| s < host.saturating_add(len)) else {
            return Ok(());
        };
        let what_table = if m.l1.iter().any(|&e| e & OFFSET_MASK == start) {
            "an L2 table"
        } else {
            "a refcount block"
        };
        Err(self.signal_corruption(format!(
            "{what} at {host:#x} would overwrite {what_table} at {start:#x}"
        )))
    }

    /// Fails, marking the image corrupt, if the cluster at `host`, which the refcounts say is
    /// free, is an L2 table with a link in flight (pinned in the cache: see `cache.rs`).
    fn check_not_pinned(&self, m: &Meta, host: u64, what: &str) -> Result<()> {
        if m.l2_cache.is_pinned(host) {
            return Err(self.signal_corruption(format!(
                "{what} at {host:#x} is an L2 table in use, yet its refcount is zero"
            )));
        }
        Ok(())
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes of the host file at `host`; bytes past its end read as zeros
    /// (a data cluster whose tail was never written).
    fn co_read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        let len = self.host_len.load(Ordering::Relaxed);
        let avail = len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        if self.direct {
            self.child.co_preadv(host, inside)
        } else {
            self.file.co_pread(host, inside)
        }
    }

    /// Writes `buf` to the host file at `host` (data or metadata), growing the file as needed.
    fn co_write_host(&self, host: u64, buf: &[u8]) -> Result<()> {
        self.co_write_file(host, buf)?;
        let end = host + buf.len() as u64;
        if end > self.host_len.load(Ordering::Relaxed) {
            self.host_len.fetch_max(end, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes `buf` at `host` without counting it in `host_len` (see [`Self::co_extend_file`]).
    fn co_write_file(&self, host: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.direct {
            self.child.co_pwritev(host, buf)
        } else {
            self.file.co_pwrite(host, buf)
        }
    }

    /// Makes the file at least `end` bytes long (`end` a multiple of 512) by writing its last
    /// sector, before a reservation's `fdatasync` makes the length durable with the refcounts:
    /// a power cut must not leave an L2 entry pointing past the end of the file (its data
    /// write lost, the file shorter), which `qemu-img check` counts as corruption and we as
    /// an entry outside the file. A write, not a truncate: it never shortens the file under a
    /// data write in flight past it. The sector is not counted in `host_len` (the clusters
    /// before it are holes, never written: see `co_write_alloc`); `close` trims the file back
    /// to `host_len`.
    pub(super) fn co_extend_file(&self, end: u64) -> Result<()> {
        if end <= self.child.getlength() {
            return Ok(());
        }
        self.co_write_file(end - 512, &[0u8; 512])
    }

    /// Writes metadata: refused once the image is known to be corrupt.
    fn co_write_meta(&self, host: u64, buf: &[u8]) -> Result<()> {
        if self.is_corrupt() {
            return Err(corrupt_refusal("metadata writes are"));
        }
        self.co_write_host(host, buf)
    }

    /// `fdatasync` of the file, as a barrier between dependent metadata updates.
    fn co_flush_host(&self) -> Result<()> {
        self.child.co_flush()
    }

    /// Reads the compressed cluster at `host` (at most `len` bytes), inflates it and copies
    /// `buf.len()` bytes from `skip` into `buf`. QEMU: `qcow2_co_preadv_compressed()`.
    #[cold]
    fn co_read_compressed(&self, host: u64, len: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
        let mut input = vec![0u8; len as usize];
        self.co_read_host(host, &mut input)?;
        let mut cluster = vec![0u8; self.cluster_size() as usize];
        let ctype = self.header.compression_type;
        decompress::decompress(ctype, &input, &mut cluster).map_err(|why| {
            self.signal_corruption(format!("compressed cluster at {host:#x}: {why}"))
        })?;
        let skip = skip as usize;
        buf.copy_from_slice(&cluster[skip..skip + buf.len()]);
        Ok(())
    }

    /// Reads guest bytes `[guest, guest + buf.len())` mapped as `m`: inside one cluster, or a
    /// run of [`Qcow2Driver::co_map_run`] (zero, unallocated, or contiguous data clusters).
    fn co_read_mapping(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        let in_cluster = guest % self.cluster_size();
        match m {
            Mapping::Zero => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.co_read_below(guest, buf),
            Mapping::Data(host) => self.co_read_host(host + in_cluster, buf),
            Mapping::Compressed(host, len) => self.co_read_compressed(host, len, in_cluster, buf),
        }
    }
}

impl Qcow2Driver {
    /// Returns the reserve and flushes; with `if_idle`, only when nothing was allocated or
    /// freed since the last flush.
    fn co_close_reserve(&self, if_idle: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let returned = {
            let mut m = self.meta.co_lock();
            (!if_idle || self.idle_since_flush(&m)) && self.co_return_reserve(&mut m)
        };
        if returned {
            self.co_flush_host()?;
            // The reservations' extensions of the file (`co_extend_file`) past what was
            // written: nothing references them now.
            let cs = self.cluster_size();
            let keep = self.host_len.load(Ordering::Relaxed).div_ceil(cs) * cs;
            if self.child.getlength() > keep {
                self.file.co_truncate(keep)?;
                self.co_flush_host()?;
            }
        }
        Ok(())
    }
}

/// A driver dropped right after a flush, with nothing written since, was closed without
/// `close` (the export flushes and drops it): its reserve is returned too, so the image checks
/// clean. One dropped with writes since the last flush is left as a crash would leave it
/// (leaks at worst). Runs the I/O on the dropping thread (or coroutine).
impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        if let Err(e) = self.co_close_reserve(true) {
            log::warn!("qcow2: cannot return the reserved clusters (leaked): {e}");
        }
    }
}

/// The error for `what` ("writes are", …) once the image was found corrupt.
#[cold]
fn corrupt_refusal(what: &str) -> BlockError {
    BlockError::Corrupt(format!(
        "qcow2: the image was found corrupt; {what} refused (run 'qemu-img check -r all')"
    ))
}

/// What a writable open refuses (read-only opens accept it). QEMU refuses other refcount
/// widths nowhere; we implement 16 bits only.
fn check_writable(h: &Header) -> Result<()> {
    if h.refcount_order != 4 {
        return Err(BlockError::Invalid(format!(
            "qcow2: refcount_bits={} is not supported for writing (only 16); open the image \
             read-only or convert it with 'qemu-img convert -O qcow2 -o refcount_bits=16'",
            1u32 << h.refcount_order
        )));
    }
    Ok(())
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn getlength(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Splits the request into runs of clusters with the same kind of mapping (contiguous data
    /// clusters become one read of the child); each run is planned under the lock and read
    /// without it.
    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, run) = {
                let mut m = self.meta.co_lock();
                self.co_map_run(&mut m, pos, (buf.len() - done) as u64)?
            };
            self.co_read_mapping(mapping, pos, &mut buf[done..done + run as usize])?;
            done += run as usize;
        }
        Ok(())
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.co_write(offset, buf)
    }

    /// Caches are write-through: the file gets an `fdatasync`, without the metadata lock
    /// (requests go on meanwhile); then the frees deferred before it started are applied (and
    /// flushed). The reserve is kept for the next writes; `close` returns it. QEMU:
    /// `qcow2_co_flush_to_os()` + `bdrv_co_flush(bs->file)`.
    fn co_flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let pending = self.take_pending(&mut self.meta.co_lock());
        if let Err(e) = self.co_flush_host() {
            self.untake_pending(&mut self.meta.co_lock(), pending);
            return Err(e);
        }
        if self.co_apply_frees(&mut self.meta.co_lock(), pending) {
            self.co_flush_host()?;
        }
        Ok(())
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.co_zero(offset, len, may_unmap)
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.co_discard(offset, len)
    }

    /// Data for allocated (and compressed) clusters; Zero for zero clusters; for unallocated
    /// ones Unallocated with a backing file (`chain` looks below), Zero without. QEMU:
    /// `qcow2_co_block_status()`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_request(offset, len)?;
        let cs = self.cluster_size();
        let has_backing = self.has_backing();
        let status = |m: Mapping| match m {
            Mapping::Data(_) | Mapping::Compressed(..) => BlockStatus::Data,
            Mapping::Unallocated if has_backing => BlockStatus::Unallocated,
            Mapping::Zero | Mapping::Unallocated => BlockStatus::Zero,
        };
        let mut m = self.meta.co_lock();
        let first = status(self.co_lookup_locked(&mut m, offset)?);
        // At most to the end of this L2 table's range, as QEMU does: callers loop.
        let per_l2 = cs * self.header.l2_entries();
        let len = len.min(per_l2 - offset % per_l2);
        let mut n = (cs - offset % cs).min(len);
        // A bad entry further on ends the extent; the caller's next call reports it.
        while n < len
            && matches!(self.co_lookup_locked(&mut m, offset + n), Ok(s) if status(s) == first)
        {
            n = (n + cs).min(len);
        }
        Ok((first, n))
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        self.co_resize(size)
    }

    /// The header stores bytes, but QEMU reads them as sectors (and so does
    /// [`Header::parse`]).
    fn size_granularity(&self) -> u64 {
        header::SECTOR_SIZE
    }

    /// Flushes, returns the reserved clusters (and flushes again), so that a closed image
    /// checks clean; then closes the chain and the file.
    fn close(&self) -> Result<()> {
        let flushed = self.co_flush().and_then(|()| self.co_close_reserve(false));
        self.close_backing();
        self.child.close().and(flushed)
    }

    fn backing_node(&self) -> Option<&dyn BlockDriver> {
        self.backing_driver()
    }
}
