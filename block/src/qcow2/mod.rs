//! The `qcow2` format driver, read-only (first step: reads, block status; no writes yet).
//!
//! QEMU: `block/qcow2.c` (`qcow2_open()`, `qcow2_co_preadv_part()`, `qcow2_co_block_status()`),
//! `block/qcow2-cluster.c` (`qcow2_get_host_offset()`), `block/qcow2-cache.c`;
//! the format is `docs/interop/qcow2.txt`.
//!
//! A guest offset maps to its data in two steps: the L1 table (loaded whole at open, it is at
//! most 32 MiB) gives the host offset of an L2 table; the L2 entry gives the cluster's state.
//! [`Qcow2Driver::co_lookup`] turns that into a [`Mapping`] plan, and the caller does the data
//! I/O without holding any lock (STYLE item 10, as QEMU drops `s->lock` around data I/O). The
//! L2 cache is a small LRU behind a `std::sync::Mutex` that is never held across a yield: on a
//! miss the table is read without the lock and inserted afterwards (two coroutines may both
//! read it; harmless for a read-only image).
//!
//! Metadata and data I/O go through a private read-only [`BlockBackend`] over the child, so a
//! child that needs alignment (O_DIRECT) is padded for us, as QEMU's `bdrv_pread()` does.
//!
//! Compressed clusters (deflate via `miniz_oxide`, zstd via `ruzstd`; see `decompress`) are
//! decompressed one whole cluster per request that touches it.
//!
//! Unallocated clusters read from below through one method, `co_read_below` (the backing
//! chain, zeros past its end or without one); `backing` opens the chain and explains the rules.
//!
//! Not yet: writes, snapshots other than the active L1 table, refcounts (a read-only driver
//! needs none, so any `refcount_order` is accepted), bitmaps.
//!
//! A metadata entry that points outside the file or is misaligned fails the request with
//! [`BlockError::Corrupt`] (EIO) and marks the image corrupt in memory (logged once, see
//! [`Qcow2Driver::is_corrupt`]); other requests keep being served. QEMU:
//! `qcow2_signal_corruption()`, which on a read-only image also only reports.

mod backing;
mod decompress;
pub mod header;
mod inflate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{BackendOptions, BlockBackend};
use crate::{BlockDriver, BlockError, BlockStatus, Result};
pub use backing::{resolve_backing_path, ChainOptions, MAX_CHAIN_DEPTH};
pub use header::Header;

/// Bits 9..=55 of an L1 or standard L2 entry: a host offset. QEMU: `L1E_OFFSET_MASK`.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: compressed cluster. QEMU: `QCOW_OFLAG_COMPRESSED`.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry (v3): reads as zeros. QEMU: `QCOW_OFLAG_ZERO`.
const OFLAG_ZERO: u64 = 1;
/// Cache at most this many bytes of L2 tables (and at least one table) ...
const L2_CACHE_BYTES: u64 = 4 << 20;
/// ... and at most this many tables: the cache is searched linearly.
const L2_CACHE_TABLES: u64 = 64;

/// What a guest cluster maps to: the plan the lookup hands to the I/O path.
/// (cloud-hypervisor `qcow/metadata.rs` calls it a mapping; QEMU `QCow2SubclusterType`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Reads as zeros (v3 zero flag).
    Zero,
    /// Not allocated: reads from the backing file, or as zeros without one.
    Unallocated,
    /// Data at this host offset (of the cluster start; cluster aligned, inside the file).
    Data(u64),
    /// Compressed data: host offset and an upper bound of its length in bytes.
    Compressed(u64, u64),
}

/// A small LRU of decoded L2 tables, keyed by host offset. QEMU: `Qcow2Cache`.
struct L2Cache {
    capacity: usize,
    /// Most recently used last.
    tables: Vec<(u64, Arc<[u64]>)>,
}

impl L2Cache {
    fn get(&mut self, offset: u64) -> Option<Arc<[u64]>> {
        let i = self.tables.iter().position(|(o, _)| *o == offset)?;
        let entry = self.tables.remove(i);
        let table = entry.1.clone();
        self.tables.push(entry);
        Some(table)
    }

    fn insert(&mut self, offset: u64, table: Arc<[u64]>) {
        if self.tables.iter().any(|(o, _)| *o == offset) {
            return;
        }
        if self.tables.len() >= self.capacity {
            self.tables.remove(0);
        }
        self.tables.push((offset, table));
    }
}

/// The qcow2 format over a child (the file driver). QEMU: `BDRVQcow2State`.
pub struct Qcow2Driver {
    child: Arc<dyn BlockDriver>,
    /// Read-only view of the child that pads unaligned metadata reads.
    file: BlockBackend,
    /// Length of the child at open (the image is read-only, so it does not change under us).
    file_len: u64,
    header: Header,
    /// The active L1 table, decoded.
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    /// Set once metadata was found inconsistent. Relaxed: only a report, orders nothing.
    corrupt: AtomicBool,
    /// The backing file (`backing.rs`), opened by [`Qcow2Driver::open_chain`].
    backing: Option<backing::Backing>,
}

impl Qcow2Driver {
    /// Opens a qcow2 image over `child`: reads and validates the header and loads the L1 table.
    /// Runs its reads on the calling thread when called outside a coroutine. Errors say what is
    /// wrong or unsupported but do not name the file (the caller does). An image with a backing
    /// file is refused: [`Qcow2Driver::open_chain`] knows where to look for it. QEMU:
    /// `qcow2_open()`.
    pub fn open(child: Arc<dyn BlockDriver>) -> Result<Qcow2Driver> {
        let driver = Qcow2Driver::open_node(child)?;
        match &driver.header.backing_file {
            Some(name) => Err(backing::needs_chain(name)),
            None => Ok(driver),
        }
    }

    /// [`Qcow2Driver::open`] without looking at the backing file (left unopened).
    fn open_node(child: Arc<dyn BlockDriver>) -> Result<Qcow2Driver> {
        let file = BlockBackend::new(
            child.clone(),
            BackendOptions {
                read_only: true,
                growable: false,
            },
        )?;
        let file_len = file.size();
        let mut head = vec![0u8; file_len.min(512) as usize];
        file.co_pread(0, &mut head)?;
        let cluster_bits = header::RawHeader::from_bytes(&head).cluster_bits.get();
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            head = vec![0u8; file_len.min(1 << cluster_bits) as usize];
            file.co_pread(0, &mut head)?;
        }
        let header = Header::parse(&head, file_len)?;
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        file.co_pread(header.l1_table_offset, &mut raw_l1)?;
        let l1 = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        let capacity = (L2_CACHE_BYTES / header.cluster_size()).clamp(1, L2_CACHE_TABLES) as usize;
        Ok(Qcow2Driver {
            child,
            file,
            file_len,
            header,
            l1,
            l2_cache: Mutex::new(L2Cache {
                capacity,
                tables: Vec::new(),
            }),
            corrupt: AtomicBool::new(false),
            backing: None,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether inconsistent metadata was found since open.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// Reports corruption once and returns the error for the request.
    #[cold]
    fn signal_corruption(&self, why: String) -> BlockError {
        if !self.corrupt.swap(true, Ordering::Relaxed) {
            log::error!("qcow2: image is corrupt: {why}; further corruption is not reported");
        }
        BlockError::Corrupt(format!("qcow2: {why}"))
    }

    /// Checks that a metadata or data cluster at `offset` is aligned and starts in the file.
    fn check_host_cluster(&self, offset: u64, what: &str) -> Result<()> {
        if offset % self.header.cluster_size() != 0 {
            return Err(
                self.signal_corruption(format!("{what} offset {offset:#x} is not cluster aligned"))
            );
        }
        if offset >= self.file_len {
            return Err(self.signal_corruption(format!(
                "{what} offset {offset:#x} is beyond the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(())
    }

    /// The L2 table at host offset `l2_offset`, from the cache or the file (read without the
    /// cache lock held).
    fn co_l2_table(&self, l2_offset: u64) -> Result<Arc<[u64]>> {
        let lock = || self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = lock().get(l2_offset) {
            return Ok(t);
        }
        let cs = self.header.cluster_size();
        if !matches!(l2_offset.checked_add(cs), Some(end) if end <= self.file_len) {
            return Err(self.signal_corruption(format!(
                "L2 table at {l2_offset:#x} extends beyond the end of the file"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.co_pread(l2_offset, &mut raw)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        lock().insert(l2_offset, table.clone());
        Ok(table)
    }

    /// Maps the guest cluster containing `offset` (< size). QEMU: `qcow2_get_host_offset()`.
    pub fn co_lookup(&self, offset: u64) -> Result<Mapping> {
        let bits = self.header.cluster_bits;
        let l2_entries = self.header.l2_entries();
        let cluster = offset >> bits;
        let l1_index = cluster / l2_entries;
        let l2_index = (cluster % l2_entries) as usize;
        let Some(&l1_entry) = self.l1.get(l1_index as usize) else {
            // The header check guarantees coverage; stay safe anyway.
            return Err(self.signal_corruption(format!("offset {offset} beyond the L1 table")));
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.check_host_cluster(l2_offset, "L2 table")?;
        let entry = self.co_l2_table(l2_offset)?[l2_index];
        self.decode_l2_entry(entry)
    }

    /// QEMU: `qcow2_get_cluster_type()` (no subclusters).
    fn decode_l2_entry(&self, entry: u64) -> Result<Mapping> {
        let bits = self.header.cluster_bits;
        if entry & OFLAG_COMPRESSED != 0 {
            // qcow2.txt: x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 extra sectors.
            let x = 62 - (bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
            if host >= self.file_len {
                return Err(self.signal_corruption(format!(
                    "compressed cluster at {host:#x} is beyond the end of the file"
                )));
            }
            return Ok(Mapping::Compressed(host, sectors * 512 - (host & 511)));
        }
        let host = entry & OFFSET_MASK;
        if entry & OFLAG_ZERO != 0 {
            if self.header.version < 3 {
                return Err(
                    self.signal_corruption("zero cluster entry found in a version 2 image".into())
                );
            }
            return Ok(Mapping::Zero);
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.check_host_cluster(host, "data cluster")?;
        Ok(Mapping::Data(host))
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.header.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes of the host file at `host`; bytes past its end read as zeros
    /// (a data cluster whose tail was never written).
    fn co_read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.file_len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        self.file.co_pread(host, inside)
    }

    /// Reads the compressed cluster at `host` (at most `len` bytes), inflates it and copies
    /// `buf.len()` bytes from `skip` into `buf`. QEMU: `qcow2_co_preadv_compressed()`.
    #[cold]
    fn co_read_compressed(&self, host: u64, len: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
        let mut input = vec![0u8; len as usize];
        self.co_read_host(host, &mut input)?;
        let mut cluster = vec![0u8; self.header.cluster_size() as usize];
        let ctype = self.header.compression_type;
        decompress::decompress(ctype, &input, &mut cluster).map_err(|why| {
            self.signal_corruption(format!("compressed cluster at {host:#x}: {why}"))
        })?;
        let skip = skip as usize;
        buf.copy_from_slice(&cluster[skip..skip + buf.len()]);
        Ok(())
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn getlength(&self) -> u64 {
        self.header.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    /// Splits the request by clusters; contiguous data clusters become one read of the child.
    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request(offset, buf.len() as u64)?;
        let cs = self.header.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let mapping = self.co_lookup(pos)?;
            // Extend the run while the next clusters continue it.
            let mut run = (cs - pos % cs).min((buf.len() - done) as u64);
            while done as u64 + run < buf.len() as u64 {
                let next = pos + run;
                let more = (buf.len() - done) as u64 - run;
                let step = cs.min(more);
                let continues = match (mapping, self.co_lookup(next)?) {
                    (Mapping::Zero, Mapping::Zero)
                    | (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero, Mapping::Unallocated)
                    | (Mapping::Unallocated, Mapping::Zero) => !self.has_backing(),
                    (Mapping::Data(h), Mapping::Data(n)) => n == h + pos % cs + run,
                    _ => false,
                };
                if !continues {
                    break;
                }
                run += step;
            }
            let chunk = &mut buf[done..done + run as usize];
            match mapping {
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => self.co_read_below(pos, chunk)?,
                Mapping::Data(host) => self.co_read_host(host + pos % cs, chunk)?,
                Mapping::Compressed(host, len) => {
                    self.co_read_compressed(host, len, pos % cs, chunk)?
                }
            }
            done += run as usize;
        }
        Ok(())
    }

    fn co_pwritev(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn co_flush(&self) -> Result<()> {
        Ok(())
    }

    fn co_pwrite_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn co_pdiscard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    /// Data for allocated (and compressed) clusters; Zero for zero clusters; for unallocated
    /// ones Unallocated with a backing file (`chain` looks below), Zero without. QEMU:
    /// `qcow2_co_block_status()`.
    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_request(offset, len)?;
        let cs = self.header.cluster_size();
        let has_backing = self.has_backing();
        let status = |m: Mapping| match m {
            Mapping::Data(_) | Mapping::Compressed(..) => BlockStatus::Data,
            Mapping::Unallocated if has_backing => BlockStatus::Unallocated,
            Mapping::Zero | Mapping::Unallocated => BlockStatus::Zero,
        };
        let first = status(self.co_lookup(offset)?);
        // At most to the end of this L2 table's range, as QEMU does: callers loop.
        let per_l2 = cs * self.header.l2_entries();
        let len = len.min(per_l2 - offset % per_l2);
        let mut n = (cs - offset % cs).min(len);
        // A bad entry further on ends the extent; the caller's next call reports it.
        while n < len && matches!(self.co_lookup(offset + n), Ok(m) if status(m) == first) {
            n = (n + cs).min(len);
        }
        Ok((first, n))
    }

    fn co_truncate(&self, _size: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn close(&self) -> Result<()> {
        self.close_backing();
        self.child.close()
    }

    fn backing_node(&self) -> Option<&dyn BlockDriver> {
        self.backing_driver()
    }
}
