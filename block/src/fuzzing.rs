//! The bodies of the block layer's fuzz targets, shared by cargo-fuzz (`fuzz/fuzz_targets/`)
//! and the corpus replay test (`block/tests/fuzz_corpus.rs`), so that `cargo test` runs every
//! committed corpus file through exactly the code libFuzzer runs.
//!
//! Not a public API (`#[doc(hidden)]`): the functions panic when an invariant breaks, which is
//! how a fuzzer learns of a bug. What they exercise is the product code on untrusted bytes:
//!
//! - [`qcow2_header`]: [`Header::parse`] of the bytes as the first cluster of files of several
//!   lengths, then the snapshot table walk ([`snapshot::read_table`]) over the same bytes;
//! - [`qcow2_image`]: the bytes as a whole image in memory ([`MemDriver`]), opened by the qcow2
//!   driver read-only (a few reads and block status queries; a range reported as zeros reads
//!   as zeros; the bytes must not change), then writable (the open may rebuild refcounts of a
//!   dirty image; then a few writes — each reads back as written unless the driver reported
//!   the image corrupt —, zeroes, a discard and a flush);
//! - [`vmdk_image`]: the bytes as a vmdk image in memory — a sparse file, or a text descriptor,
//!   a NUL and the bytes of the extent file(s) it names — opened by the vmdk driver and read
//!   as `qcow2_image`'s read-only part (the bytes must not change);
//! - [`backing_name`]: a header naming the bytes as its backing file, then the path resolution
//!   of [`resolve_backing_path`] and the protocol check;
//! - [`partition_table`]: the bytes as the start of a disk of a size they give, through the
//!   MBR/GPT parser;
//! - [`nbd_server`]: the bytes as everything an NBD server says — first to the handshake (an
//!   in-memory stream), then, from a fixed offset, as the replies on a real socket pair to
//!   requests in flight in the NBD driver's connection (`nbd/conn.rs`): every request must
//!   end (no hang), with a result or EIO.
//! - [`vdi_image`], [`vpc_image`], [`vhdx_image`]: the bytes, a *sparse image* (see
//!   [`expand_sparse`]: these formats put their metadata megabytes apart), opened read-only by
//!   the driver; reads and block status must not panic, a zero range reads as zeros, nothing is
//!   written.
//!
//! Everything stays in memory: no file is created, no backing file is opened.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{BackendOptions, BlockBackend};
use crate::partition::read_partitions;
use crate::qcow2::header::{MAX_BACKING_NAME, MAX_L1_BYTES};
use crate::qcow2::{resolve_backing_path, snapshot, Header, Qcow2Driver, Qcow2Options};
use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// An image held in memory: a protocol driver for fuzzing (and tests) that never touches a
/// file. Reads past the end return zeros; a writable one grows up to `limit` bytes, and refuses
/// writes beyond (an I/O error), which bounds what a crafted image can make the driver append.
pub struct MemDriver {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    limit: u64,
    /// Write-type requests that reached the driver (also the refused ones).
    writes: AtomicU64,
}

impl MemDriver {
    /// An image of `bytes`; writable ones may grow to `limit` bytes.
    pub fn new(bytes: Vec<u8>, read_only: bool, limit: u64) -> MemDriver {
        MemDriver {
            bytes: Mutex::new(bytes),
            read_only,
            limit,
            writes: AtomicU64::new(0),
        }
    }

    /// The current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// How many write, write-zeroes, discard and truncate requests arrived.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes `[offset, offset+len)` for writing, grown as needed.
    fn range(&self, offset: u64, len: u64) -> Result<(MutexGuard<'_, Vec<u8>>, usize, usize)> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.limit)
            .ok_or_else(|| {
                BlockError::Io(std::io::Error::other(format!(
                    "memory image: {offset}+{len} beyond its limit of {} bytes",
                    self.limit
                )))
            })?;
        let mut bytes = self.lock();
        if end as usize > bytes.len() {
            bytes.resize(end as usize, 0);
        }
        Ok((bytes, offset as usize, end as usize))
    }
}

impl BlockDriver for MemDriver {
    fn format_name(&self) -> &'static str {
        "memory"
    }

    fn getlength(&self) -> u64 {
        self.lock().len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bytes = self.lock();
        buf.fill(0);
        let start = (offset.min(bytes.len() as u64)) as usize;
        let n = (bytes.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(())
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let (mut bytes, start, end) = self.range(offset, buf.len() as u64)?;
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn co_flush(&self) -> Result<()> {
        Ok(())
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        let (mut bytes, start, end) = self.range(offset, len)?;
        bytes[start..end].fill(0);
        Ok(())
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.co_pwrite_zeroes(offset, len, true)
    }

    fn co_block_status(&self, _offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, len.max(1)))
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        let (mut bytes, _, _) = self.range(size, 0)?;
        bytes.truncate(size as usize);
        Ok(())
    }
}

/// Runs `f` in a coroutine on this thread; a panic inside it is re-raised here, where the
/// fuzzer (or the test) sees it.
fn co<T: 'static>(f: impl FnOnce() -> T + 'static) -> T {
    match runtime::spawn(f).join() {
        Ok(v) => v,
        Err(p) => panic!("{p}"),
    }
}

/// File lengths to validate a header against: the bytes themselves, and files that are longer
/// than the first cluster we were given.
fn file_lengths(len: u64) -> [u64; 3] {
    [len, len + (1 << 20), 1 << 40]
}

/// Fuzz target `qcow2_header`: the header parser and the snapshot table walk on `data`.
pub fn qcow2_header(data: &[u8]) {
    for file_len in file_lengths(data.len() as u64) {
        let Ok(h) = Header::parse(data, file_len) else {
            continue;
        };
        check_header(&h, file_len);
        // The snapshot table, over the same bytes (zeros past their end, as MemDriver reads).
        if h.nb_snapshots > 0 {
            let read = |pos: u64, buf: &mut [u8]| {
                buf.fill(0);
                let start = pos.min(data.len() as u64) as usize;
                let n = (data.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&data[start..start + n]);
                Ok(())
            };
            if let Ok((entries, end)) =
                snapshot::read_table(h.snapshots_offset, h.nb_snapshots, file_len, read)
            {
                assert_eq!(entries.len(), h.nb_snapshots as usize);
                assert!(end <= file_len, "the table ends inside the file");
                for e in &entries {
                    assert!(e.offset >= h.snapshots_offset && e.offset + e.len <= end);
                    assert!(e.len >= snapshot::FIXED_LEN as u64);
                }
            }
        }
    }
}

/// What a successful [`Header::parse`] promises.
fn check_header(h: &Header, file_len: u64) {
    assert!(h.version == 2 || h.version == 3);
    assert!((9..=21).contains(&h.cluster_bits));
    let cs = h.cluster_size();
    assert!(u64::from(h.header_length) <= cs);
    assert!(h.size <= i64::MAX as u64);
    assert!(u64::from(h.l1_size) * 8 <= MAX_L1_BYTES);
    assert_eq!(h.l1_table_offset % cs, 0);
    if h.l1_size > 0 {
        assert!(h.l1_table_offset > 0 && h.l1_table_offset + u64::from(h.l1_size) * 8 <= file_len);
    }
    // The L1 table covers the virtual size.
    assert!(u64::from(h.l1_size) * (cs / 8) * cs >= h.size);
    assert!(h.refcount_order <= 6);
    if let Some(name) = &h.backing_file {
        use std::os::unix::ffi::OsStrExt;
        let b = name.as_os_str().as_bytes();
        assert!(!b.is_empty() && b.len() <= MAX_BACKING_NAME as usize && !b.contains(&0));
    }
}

/// Reads `buf.len()` bytes at `offset` if the range is inside the image; an error is fine.
fn read_some(blk: &BlockBackend, offset: u64, len: u64) -> Option<Vec<u8>> {
    let size = blk.size();
    let offset = offset.min(size);
    let len = len.min(size - offset);
    let mut buf = vec![0u8; len as usize];
    blk.co_pread(offset, &mut buf).ok().map(|()| buf)
}

/// Offsets spread over the virtual size, picked by the data itself (so the fuzzer can steer):
/// its last 32 bytes, which are rarely header or tables.
fn offsets(data: &[u8], size: u64) -> Vec<u64> {
    let mut v = vec![0, size / 2, size.saturating_sub(4096)];
    for chunk in data.rchunks_exact(8).take(4) {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        v.push(x % size.max(1));
    }
    v
}

/// The read-only part of [`qcow2_image`]: reads and block status must not fail by panicking,
/// a range reported as zero must read as zeros.
/// Puts `driver` under a read-only backend and runs [`exercise_read_only`] in a coroutine;
/// with `refuses_writes` (a read-only format), a write must fail too.
fn exercise_driver(driver: Arc<dyn BlockDriver>, data: &[u8], refuses_writes: bool) {
    let opts = BackendOptions {
        read_only: true,
        write_beyond_eof: false,
        ..BackendOptions::default()
    };
    let Ok(blk) = BlockBackend::new(driver, opts) else {
        return;
    };
    let blk = Arc::new(blk);
    let (b, d) = (blk.clone(), data.to_vec());
    co(move || {
        exercise_read_only(&b, &d);
        if refuses_writes {
            assert!(
                b.co_pwrite(0, &[1]).is_err(),
                "a read-only format took a write"
            );
        }
    });
    let _ = blk.close();
}

fn exercise_read_only(blk: &BlockBackend, data: &[u8]) {
    let size = blk.size();
    for off in offsets(data, size) {
        let _ = read_some(blk, off, 65536);
        let _ = read_some(blk, off | 511, 700);
    }
    // A bounded walk of block status from the start.
    let mut pos = 0;
    for _ in 0..64 {
        if pos >= size {
            break;
        }
        match blk.co_block_status(pos, size - pos) {
            Ok((status, n)) => {
                assert!(
                    n >= 1 && n <= size - pos,
                    "block status of {n} bytes at {pos}"
                );
                if status == BlockStatus::Zero {
                    if let Some(bytes) = read_some(blk, pos, n.min(65536)) {
                        assert!(
                            bytes.iter().all(|&b| b == 0),
                            "a zero range at {pos} reads data"
                        );
                    }
                }
                pos += n;
            }
            Err(_) => pos = pos.saturating_add(65536),
        }
    }
}

/// Fuzz target `qcow2_image`: `data` as a whole qcow2 image in memory, opened read-only and
/// exercised (the bytes must stay as they are), then opened writable and written to.
pub fn qcow2_image(data: &[u8]) {
    let opts = Qcow2Options {
        l2_cache_bytes: 1 << 16,
        refcount_cache_bytes: 1 << 16,
    };
    // Read-only: nothing may be written, whatever the image says.
    let child = Arc::new(MemDriver::new(data.to_vec(), true, 0));
    if let Ok(driver) = Qcow2Driver::open_with(child.clone(), &opts) {
        exercise_driver(Arc::new(driver), data, false);
    }
    assert_eq!(child.writes(), 0, "a read-only open wrote to the image");
    assert!(
        child.contents() == data,
        "a read-only open changed the image"
    );

    // Writable: may repair a dirty image, grows by at most 16 MiB.
    let limit = data.len() as u64 + (16 << 20);
    let child = Arc::new(MemDriver::new(data.to_vec(), false, limit));
    let Ok(driver) = Qcow2Driver::open_with(child, &opts) else {
        return;
    };
    let backend = BackendOptions {
        read_only: false,
        write_beyond_eof: false,
        ..BackendOptions::default()
    };
    let driver = Arc::new(driver);
    let Ok(blk) = BlockBackend::new(driver.clone(), backend) else {
        return;
    };
    let blk = Arc::new(blk);
    let (b, d) = (blk.clone(), data.to_vec());
    co(move || {
        let size = b.size();
        let offs = offsets(&d, size);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
        for (k, &off) in offs.iter().enumerate() {
            let len = (size - off.min(size)).min(if k % 2 == 0 { 8192 } else { 700 });
            let data = &pattern[..len as usize];
            if b.co_pwrite(off, data).is_ok() {
                // What was written reads back, unless the driver found the image corrupt.
                let mut back = vec![0u8; data.len()];
                if b.co_pread(off, &mut back).is_ok() && !driver.is_corrupt() {
                    assert!(
                        back == data,
                        "a write of {len} bytes at {off} reads back otherwise"
                    );
                }
            }
        }
        if let Some(&off) = offs.get(3) {
            let _ = b.co_pwrite_zeroes(off, (size - off).min(1 << 16), off % 2 == 0);
            let _ = b.co_pdiscard(off / 2, (size - off / 2).min(1 << 16));
        }
        let _ = b.co_flush();
        exercise_read_only(&b, &d);
    });
    let _ = blk.close();
}

/// Fuzz target `vmdk_image`: `data` as a vmdk image in memory. A sparse extent (`KDMV`, or
/// the refused `COWD`) is the whole file; anything else is a descriptor up to the first NUL,
/// and every extent file it names is the bytes after that NUL (at most 16 opens). Opened
/// read-only and read like `qcow2_image`'s read-only part; the bytes must not change.
pub fn vmdk_image(data: &[u8]) {
    let sparse = data.starts_with(b"KDMV") || data.starts_with(b"COWD");
    let (first, extent) = match data.iter().position(|&b| b == 0) {
        Some(nul) if !sparse => (&data[..nul], &data[nul + 1..]),
        _ => (data, &[][..]),
    };
    let child = Arc::new(MemDriver::new(first.to_vec(), true, 0));
    let extent_file = Arc::new(MemDriver::new(extent.to_vec(), true, 0));
    let mut opens = 0;
    let mut open_extent = |path: &Path| -> Result<Arc<dyn BlockDriver>> {
        opens += 1;
        if opens > 16 {
            return Err(BlockError::Invalid(format!(
                "{}: too many extents",
                path.display()
            )));
        }
        Ok(extent_file.clone())
    };
    if let Ok(driver) =
        crate::VmdkDriver::open_with(child.clone(), Path::new("fuzz.vmdk"), &mut open_extent)
    {
        assert!(driver.getlength() <= i64::MAX as u64);
        exercise_driver(Arc::new(driver), data, false);
    }
    assert_eq!(child.writes() + extent_file.writes(), 0, "a read wrote");
    assert!(child.contents() == first && extent_file.contents() == extent);
}

/// Fuzz target `backing_name`: `data` (up to [`MAX_BACKING_NAME`] + 1 bytes used) as the
/// backing file name of an otherwise valid header, then resolved against a few image paths.
pub fn backing_name(data: &[u8]) {
    let name = &data[..data.len().min(MAX_BACKING_NAME as usize + 1)];
    let head = header_with_backing(name);
    let parsed = Header::parse(&head, 4 << 12);
    let valid = !name.is_empty() && !name.contains(&0) && name.len() <= MAX_BACKING_NAME as usize;
    match &parsed {
        Ok(h) => {
            use std::os::unix::ffi::OsStrExt;
            match &h.backing_file {
                Some(b) => assert!(valid && b.as_os_str().as_bytes() == name),
                None => assert!(name.is_empty(), "a name was dropped"),
            }
        }
        Err(_) => assert!(!valid || name.is_empty(), "a valid name was refused"),
    }
    let Ok(Header {
        backing_file: Some(name),
        ..
    }) = parsed
    else {
        return;
    };
    for image in ["top.qcow2", "/images/top.qcow2", "a/b/c.qcow2", "/", ""] {
        let image = Path::new(image);
        let path = resolve_backing_path(image, &name);
        if name.is_absolute() {
            assert_eq!(path, name);
        } else if let Some(dir) = image.parent() {
            assert!(path.starts_with(dir), "{path:?} outside {dir:?}");
        }
    }
    let _ = crate::qcow2::has_protocol(&name);
    // The top image alone refuses to open without its path, naming the file.
    let child = Arc::new(MemDriver::new(image_with_header(&head), true, 0));
    if let Err(e) = Qcow2Driver::open(child) {
        let _ = e.to_string();
    }
}

/// Fuzz target `partition_table`: the first 8 bytes (little endian, at most 2^44) are the
/// disk's size, the rest its first bytes (zeros after them). [`read_partitions`] must not
/// panic, and what it accepts keeps its promises: every partition non-empty, inside the disk,
/// overlapping no other, numbers unique.
pub fn partition_table(data: &[u8]) {
    let (size, disk) = match data.split_first_chunk::<8>() {
        Some((s, rest)) => (u64::from_le_bytes(*s) & ((1 << 44) - 1), rest),
        None => return,
    };
    let mut reads = 0u32;
    let mut read = |offset: u64, buf: &mut [u8]| -> std::io::Result<()> {
        reads += 1;
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if let Some(src) = disk.get(start..) {
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
            }
        }
        Ok(())
    };
    let Ok(Some(table)) = read_partitions(&mut read, size) else {
        return;
    };
    let mut parts: Vec<_> = table.partitions.iter().collect();
    parts.sort_by_key(|p| p.offset);
    for p in &parts {
        assert!(p.size > 0, "partition {} is empty", p.number);
        assert!(
            p.offset.checked_add(p.size).is_some_and(|e| e <= size),
            "partition {} past the end",
            p.number
        );
    }
    for w in parts.windows(2) {
        assert!(w[0].offset + w[0].size <= w[1].offset, "overlap");
    }
    let mut numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), parts.len(), "a number twice");
    assert!(reads <= 200, "{reads} reads for one table");
}

/// Fuzz target `nbd_server`: `data[..512]` (zero-padded) is what a server answers in the
/// handshake; `data[512..]` what it sends once transmission starts, in reply to a read of
/// 4096 bytes at 8192 (cookie `0x10000`), a block status query (`0x10001`) and a write
/// (`0x10002`) in flight at once. The handshake must not panic and what it accepts must be
/// sane; each request must end — the bytes run out, then the socket says EOF.
pub fn nbd_server(data: &[u8]) {
    use crate::nbd::{conn, handshake, uri::Stream};
    use std::io::Write;
    let (hello, replies) = data.split_at(data.len().min(512));
    let mut fake = FakeServer(hello);
    if let Ok(info) = handshake::negotiate(&mut fake, "export") {
        assert!(info.size <= i64::MAX as u64);
        assert!(info.min_block.is_power_of_two() && info.max_block >= info.min_block);
        assert!(info.max_block <= handshake::MAX_PAYLOAD);
    }
    let replies = &replies[..replies.len().min(64 * 1024)]; // fits a socket buffer
    let Ok((ours, mut theirs)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    if theirs.write_all(replies).is_err() {
        return;
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let info = handshake::ExportInfo {
        size: 1 << 20,
        flags: crate::nbd::proto::FLAG_HAS_FLAGS,
        min_block: 1,
        pref_block: 4096,
        max_block: 1 << 20,
        structured: true,
        meta_context: Some(1),
    };
    let Ok(c) = conn::Conn::new(Stream::Unix(ours), info, "fuzz".into(), None) else {
        return;
    };
    let c = Arc::new(c);
    // Drain what the requests send, so that the write never waits for room.
    let sink = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while matches!(std::io::Read::read(&mut theirs, &mut buf), Ok(n) if n > 0) {}
    });
    conn::spawn_reader(c.clone(), |_| {});
    let requests = [(crate::nbd::proto::CMD_READ, 0u16), (7, 1), (1, 2)];
    let handles: Vec<_> = requests
        .into_iter()
        .map(|(ty, _)| {
            let c = c.clone();
            runtime::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let data = match ty {
                    0 => conn::Data::In(&mut buf),
                    1 => conn::Data::Out(&[7u8; 4096]),
                    _ => conn::Data::Status(None),
                };
                let flags = if ty == 7 { 8 } else { 0 };
                let mut req = conn::Request {
                    ty,
                    flags,
                    offset: 8192,
                    len: 4096,
                    data,
                };
                c.co_request(&mut req).is_ok()
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    c.kill("");
    // The reader ends on the shut-down socket.
    let ctx = runtime::AioContext::current();
    while ctx.poll(false) {}
    let _ = sink.join();
}

/// The server side of a handshake, from bytes; what the client writes is dropped.
struct FakeServer<'a>(&'a [u8]);

impl std::io::Read for FakeServer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

impl std::io::Write for FakeServer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A valid v3 header (512-byte clusters, 1 MiB) whose backing file name is `name`, stored
/// after the header extensions at offset 1024 of a 4 KiB first cluster.
fn header_with_backing(name: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(8, &1024u64.to_be_bytes());
    put(16, &(name.len() as u32).to_be_bytes());
    put(20, &12u32.to_be_bytes()); // 4 KiB clusters
    put(24, &(1u64 << 20).to_be_bytes());
    put(36, &1u32.to_be_bytes()); // l1_size
    put(40, &(3u64 << 12).to_be_bytes()); // L1 at cluster 3
    put(48, &(1u64 << 12).to_be_bytes()); // refcount table at cluster 1
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &112u32.to_be_bytes());
    put(112, &0xe279_2acau32.to_be_bytes()); // backing format "raw"
    put(116, &3u32.to_be_bytes());
    put(120, b"raw");
    let n = name.len().min(4096 - 1024);
    put(1024, &name[..n]);
    b
}

/// The header as the first cluster of a 4-cluster image (refcount table, block, L1).
fn image_with_header(head: &[u8]) -> Vec<u8> {
    let mut b = head.to_vec();
    b.resize(4 << 12, 0);
    b
}

/// The files of a fuzz corpus directory, sorted, with their bytes, for the corpus replay tests
/// (`block/tests/fuzz_corpus.rs`, `fuse/tests/fuzz_corpus.rs`); panics if there are none.
pub fn corpus_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// The largest image [`expand_sparse`] makes.
const SPARSE_LIMIT: u64 = 64 << 20;

/// A fuzz input as an image: records of a 4-byte little-endian offset in 512-byte sectors, a
/// 2-byte little-endian length and that many bytes, placed at the offset in a zero-filled image
/// as long as the furthest record's end (at most 64 MiB; records beyond are dropped). A
/// trailing partial record counts with the bytes it has. Lets a few KiB describe a vhdx file,
/// whose headers, log, metadata and BAT lie a megabyte apart. [`compact_sparse`] is the
/// inverse.
pub fn expand_sparse(data: &[u8]) -> Vec<u8> {
    let mut image = Vec::new();
    let mut rest = data;
    while rest.len() >= 6 {
        let sector = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = usize::from(u16::from_le_bytes([rest[4], rest[5]]));
        let bytes = &rest[6..(6 + len).min(rest.len())];
        rest = &rest[(6 + len).min(rest.len())..];
        let at = u64::from(sector) * 512;
        let end = at + bytes.len() as u64;
        if end > SPARSE_LIMIT {
            continue;
        }
        if end as usize > image.len() {
            image.resize(end as usize, 0);
        }
        image[at as usize..end as usize].copy_from_slice(bytes);
    }
    image
}

/// The sparse form of `image` (see [`expand_sparse`]): one record per run of non-zero
/// 512-byte sectors (at most 127 sectors a record), and an empty record at the end so the
/// length survives. For making seeds from real images.
pub fn compact_sparse(image: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut record = |sector: usize, bytes: &[u8]| {
        out.extend_from_slice(&(sector as u32).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let sectors: Vec<&[u8]> = image.chunks(512).collect();
    let mut i = 0;
    while i < sectors.len() {
        if sectors[i].iter().all(|&b| b == 0) {
            i += 1;
            continue;
        }
        let start = i;
        while i < sectors.len() && i - start < 127 && sectors[i].iter().any(|&b| b != 0) {
            i += 1;
        }
        record(start, &image[start * 512..(i * 512).min(image.len())]);
    }
    if image.len().is_multiple_of(512) && !image.is_empty() {
        // An empty record cannot set a length inside a sector: end on the last sector.
        let last = image.len() / 512 - 1;
        record(last, &image[last * 512..]);
    }
    out
}

/// The body of the read-only format targets: `data` expanded ([`expand_sparse`]) into a
/// read-only image in memory, opened by `open`, read and queried; nothing may be written.
fn read_only_image<D: BlockDriver>(data: &[u8], open: fn(Arc<dyn BlockDriver>) -> Result<D>) {
    let image = expand_sparse(data);
    let child = Arc::new(MemDriver::new(image.clone(), true, 0));
    if let Ok(driver) = open(child.clone()) {
        assert!(driver.is_read_only());
        exercise_driver(Arc::new(driver), data, true);
    }
    assert_eq!(child.writes(), 0, "a read-only driver wrote to the image");
    assert!(
        child.contents() == image,
        "a read-only driver changed the image"
    );
}

/// Fuzz target `vdi_image`.
pub fn vdi_image(data: &[u8]) {
    read_only_image(data, crate::vdi::VdiDriver::open);
}

/// Fuzz target `vpc_image`.
pub fn vpc_image(data: &[u8]) {
    read_only_image(data, crate::vpc::VpcDriver::open);
}

/// Fuzz target `vhdx_image` (differencing images are refused without a path, so the parent
/// code is not reached; the sector bitmap path is, through a non-differencing image's BAT).
pub fn vhdx_image(data: &[u8]) {
    read_only_image(data, crate::vhdx::VhdxDriver::open);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip() {
        let mut image = vec![0u8; 5 << 20];
        image[10] = 1;
        image[(1 << 20)..(1 << 20) + 100_000].fill(7);
        image[(5 << 20) - 1] = 9;
        assert!(expand_sparse(&compact_sparse(&image)) == image);
        let small = vec![3u8; 1000];
        assert_eq!(expand_sparse(&compact_sparse(&small)), small);
        assert!(expand_sparse(&[1, 2, 3]).is_empty());
        // Beyond the limit: dropped.
        assert!(expand_sparse(&[0xff, 0xff, 0xff, 0xff, 1, 0, 5]).is_empty());
    }
}
