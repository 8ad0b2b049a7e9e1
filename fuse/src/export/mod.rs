//! The export's semantics: what each FUSE request does to the image, independent of how the
//! request was read or the reply is written.
//!
//! QEMU: `block/export/fuse.c` (`fuse_co_init`, `fuse_co_getattr`, `fuse_co_setattr`,
//! `fuse_co_read`, `fuse_co_write`, `fuse_co_fallocate`, `fuse_co_lseek`, …) after the series
//! "export/fuse: Use coroutines and multi-threading"; the cases are those of
//! `tests/qemu-iotests/308`.
//!
//! [`Export::co_handle`] runs inside the request's coroutine and may yield in the block layer;
//! [`Export::handle_async`] is the same handler as a future, for `--engine async`. They never
//! panic on what the kernel sends: every failure becomes an errno in the reply.
//!
//! ## Two engines, one set of semantics
//!
//! A handler is split in three: `Export::plan` (dispatch, validation, EOF clamping, the
//! replies of opcodes without I/O — pure, shared, in this file), the I/O (an `Io` value,
//! executed by `co_io` with `co_` calls in `coroutine.rs`, or by `io_async` with `.await`s in
//! `async_engine.rs` — the only code that exists twice), and a `*_finish` function that turns
//! the result into the reply (shared, here). So "read the header, yield on I/O, reply" is the
//! same sequence in both engines, and one engine can be read without the other;
//! `docs/comparison.md` compares the two I/O halves line by line.
//!
//! The exported file is inode 1 when the mountpoint is a regular file (QEMU style). When the
//! mountpoint is a directory (nbdfuse style), inode 1 is that directory and the image appears
//! in it as inode 2, named after the image file, and each partition of its table as inode 3,
//! 4, … (`<name>-partN`, chosen by `server.rs`). A file may be a [`Window`] of the image (a
//! partition, or the whole export with `--partition N`): its requests are the image's at
//! `offset + window.offset`, clamped at the window's end, and it never changes size.
//!
//! The rules that matter to clients (all from QEMU):
//! - READ at or after EOF returns 0 bytes, across EOF a short read;
//! - WRITE at or after EOF on a non-growable export writes 0 bytes (`dd` then reports "No space
//!   left on device"), across EOF a short write; a growable export grows first;
//! - SETATTR may change the size (truncate; EACCES when read-only) and the mode (EPERM for
//!   group/other bits without allow_other; EROFS for +w when read-only); uid/gid only with
//!   allow_other; anything else is ENOTSUP;
//! - FALLOCATE mode 0 only at or after EOF (it grows); PUNCH_HOLE needs KEEP_SIZE and becomes
//!   write-zeroes with unmap (it deallocates only with `--discard unmap`: the backend drops
//!   the unmap under the default `ignore`, so the range still reads as zeros); ZERO_RANGE grows
//!   unless KEEP_SIZE; other modes EOPNOTSUPP;
//! - LSEEK SEEK_DATA/SEEK_HOLE from block status, ENXIO past EOF;
//! - a backend error is that request's errno (EIO); the export keeps serving.
//!
//! Growth (a growable write, fallocate or ZERO_RANGE past EOF) goes to the end of the request
//! rounded up to the image's size granularity — 512 bytes on qcow2, whose size QEMU reads in
//! sectors — so what was acknowledged is what a restart shows; a SETATTR size that the format
//! cannot keep (not a multiple of 512 on qcow2) is EINVAL, as in QEMU.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use block::{BlockBackend, BlockStatus};
use runtime::CoMutex;
use smallvec::SmallVec;
use zerocopy::IntoBytes;

use crate::protocol::abi::*;
use crate::protocol::reply::{self, InitConfig, Negotiated};
use crate::protocol::request::{Operation, Request};
use crate::transport::buf::{self, Buf};

mod async_engine;
mod coroutine;

/// Attribute and entry validity the kernel may cache (seconds). Short, because the size
/// changes under the kernel's feet (truncate, growable writes from other queues).
const ATTR_VALID_SECS: u64 = 1;

/// How a request is answered.
pub enum Response {
    /// No reply at all (FORGET, BATCH_FORGET, INTERRUPT).
    None,
    /// An error reply; a positive errno.
    Err(i32),
    /// A success reply whose payload is these bytes (empty for "ok").
    Bytes(SmallVec<[u8; 128]>),
    /// READ data: the first `len` bytes of the buffer. The buffer goes back to the pool.
    Data(Buf, usize),
    /// READ data already in the buffer the transport lent ([`Export::co_handle_into`]): its
    /// first `len` bytes.
    InPlace(usize),
}

impl Response {
    fn ok() -> Response {
        Response::Bytes(SmallVec::new())
    }

    fn bytes(b: &[u8]) -> Response {
        Response::Bytes(SmallVec::from_slice(b))
    }
}

fn errno_of(e: &block::BlockError) -> i32 {
    e.errno()
}

/// Options of one export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Writes allowed.
    pub writable: bool,
    /// Writes past EOF grow the image.
    pub growable: bool,
    /// Other users may access the mount (mount option `allow_other`).
    pub allow_other: bool,
    /// Directory mode: the name of the file shown in the mountpoint directory.
    pub dir_entry: Option<OsString>,
    /// The exported file is this window of the image, not all of it (`--partition N`).
    pub window: Option<Window>,
    /// Directory mode: more files beside the image, each a window of it (its partitions,
    /// `<name>-partN`), as inodes 3, 4, ….
    pub partitions: Vec<(OsString, Window)>,
    /// What we offer in INIT.
    pub init: InitConfig,
}

/// A byte range of the image shown as a file of its own: a partition. Its size is fixed —
/// writes stop at its end, truncate to another size is EINVAL, as on a partition's block
/// device — and the whole image may not shrink below it while it is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub offset: u64,
    pub size: u64,
}

/// Mode and ownership of an exported file; changed by SETATTR.
#[derive(Clone, Copy, Debug)]
struct FileAttrs {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// One file the export shows: the image, or a window of it.
struct ExportedFile {
    name: OsString,
    window: Option<Window>,
    attrs: Mutex<FileAttrs>,
}

/// Where a file's bytes are in the image: from `base`, `fixed` bytes long — or, without a
/// window, the whole image at its current size.
#[derive(Clone, Copy, Debug)]
struct Extent {
    base: u64,
    fixed: Option<u64>,
}

impl ExportedFile {
    fn extent(&self) -> Extent {
        match self.window {
            Some(w) => Extent {
                base: w.offset,
                fixed: Some(w.size),
            },
            None => Extent {
                base: 0,
                fixed: None,
            },
        }
    }

    fn attrs(&self) -> FileAttrs {
        *self.attrs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One exported image, shared by all queue threads.
pub struct Export {
    blk: Arc<BlockBackend>,
    cfg: ExportConfig,
    /// The files shown: `files[0]` is inode 1 (file mode) or 2 (directory mode), `files[k]`
    /// inode `k + 2` in directory mode.
    files: Vec<ExportedFile>,
    /// Where the last exported partition ends: the image may not shrink below it.
    partitions_end: u64,
    /// Negotiated at INIT (once).
    negotiated: OnceLock<Negotiated>,
    /// Protocol minor for parsing: 0 before INIT, then the negotiated one.
    minor: AtomicU32,
    /// Serialises size changes (growable writes, truncate, fallocate): check-then-grow must
    /// not race with another queue's. The growth rules live here, in `Export::co_grow_to`,
    /// and nowhere in the block layer (QEMU: `fuse_co_write()` grows, not the BlockBackend).
    resize_lock: CoMutex<()>,
    /// Time of the last change, for mtime/ctime (seconds since the epoch).
    changed: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Export {
    pub fn new(blk: Arc<BlockBackend>, cfg: ExportConfig) -> Export {
        let (uid, gid) = (crate::sys::getuid(), crate::sys::getgid());
        let mode = libc::S_IFREG | libc::S_IRUSR | if cfg.writable { libc::S_IWUSR } else { 0 };
        let file = |name: OsString, window| ExportedFile {
            name,
            window,
            attrs: Mutex::new(FileAttrs { mode, uid, gid }),
        };
        let mut files = vec![file(cfg.dir_entry.clone().unwrap_or_default(), cfg.window)];
        let mut partitions_end = 0;
        if cfg.dir_entry.is_some() {
            for (name, w) in &cfg.partitions {
                files.push(file(name.clone(), Some(*w)));
                partitions_end = partitions_end.max(w.offset.saturating_add(w.size));
            }
        }
        Export {
            blk,
            cfg,
            files,
            partitions_end,
            negotiated: OnceLock::new(),
            minor: AtomicU32::new(0),
            resize_lock: CoMutex::new(()),
            changed: AtomicU64::new(now_secs()),
        }
    }

    /// The block backend.
    pub fn blk(&self) -> &Arc<BlockBackend> {
        &self.blk
    }

    /// The export's options.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// The protocol minor to parse requests with (0 before INIT).
    pub fn minor(&self) -> u32 {
        self.minor.load(Ordering::Acquire)
    }

    /// The session parameters, once INIT is done.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.get()
    }

    /// The file of inode `ino`, or `None` (the directory, or no such inode).
    fn file(&self, ino: u64) -> Option<&ExportedFile> {
        let index = if self.cfg.dir_entry.is_some() {
            ino.checked_sub(2)?
        } else if ino == FUSE_ROOT_ID {
            0
        } else {
            return None;
        };
        self.files.get(usize::try_from(index).ok()?)
    }

    /// The inode of `files[index]`.
    fn ino_of(&self, index: usize) -> u64 {
        if self.cfg.dir_entry.is_some() {
            index as u64 + 2
        } else {
            FUSE_ROOT_ID
        }
    }

    /// The current size of a file with this extent.
    fn size_of(&self, e: Extent) -> u64 {
        e.fixed.unwrap_or_else(|| self.blk.size())
    }

    fn touch(&self) {
        self.changed.store(now_secs(), Ordering::Relaxed);
    }

    /// Everything a request needs that does no I/O — dispatch, validation, EOF clamping, the
    /// replies of the pure opcodes — shared by both engines.
    fn plan<'a>(&self, req: &'a Request<'_>) -> Step<'a> {
        let nodeid = req.nodeid();
        Step::Done(match req.op {
            Operation::Init(ref init) => self.init(init),
            Operation::Destroy => Response::ok(),
            Operation::Forget(_) | Operation::BatchForget { .. } | Operation::Interrupt(_) => {
                Response::None
            }
            Operation::Statfs => self.statfs(),
            Operation::Lookup { name } => self.lookup(nodeid, name.to_bytes()),
            Operation::Getattr(_) => self.getattr(nodeid),
            Operation::Setattr(ref arg) => return self.plan_setattr(nodeid, arg),
            Operation::Open(_) => self.open(nodeid),
            Operation::Release(_) => Response::ok(),
            Operation::Read(ref arg) => return self.plan_read(nodeid, arg),
            Operation::Write { ref arg, data } => return self.plan_write(nodeid, arg, data),
            Operation::Fallocate(ref arg) => return self.plan_fallocate(nodeid, arg),
            Operation::Fsync(_) | Operation::Flush(_) => return Step::Io(Io::Flush),
            Operation::Lseek(ref arg) => return self.plan_lseek(nodeid, arg),
            Operation::Opendir(_) if self.is_dir(nodeid) => Response::bytes(
                fuse_open_out {
                    fh: 0,
                    open_flags: 0,
                    backing_id: 0,
                }
                .as_bytes(),
            ),
            Operation::Readdir(ref arg) if self.is_dir(nodeid) => self.readdir(arg),
            Operation::Releasedir(_) => Response::ok(),
            Operation::Opendir(_) | Operation::Readdir(_) => Response::Err(libc::ENOTDIR),
            Operation::Unknown(_) => Response::Err(libc::ENOSYS),
        })
    }

    fn is_dir(&self, nodeid: u64) -> bool {
        self.cfg.dir_entry.is_some() && nodeid == FUSE_ROOT_ID
    }

    fn init(&self, init: &fuse_init_in) -> Response {
        match reply::negotiate_init(init, &self.cfg.init) {
            Ok(r) => {
                if let Some(n) = r.negotiated() {
                    if self.negotiated.set(*n).is_err() {
                        log::warn!("second FUSE_INIT ignored");
                        return Response::Err(libc::EINVAL);
                    }
                    self.minor.store(n.minor, Ordering::Release);
                    log::debug!(
                        "FUSE 7.{}: flags {:#x}, max_write {}, max_pages {}",
                        n.minor,
                        n.flags,
                        n.max_write,
                        n.max_pages
                    );
                }
                Response::bytes(r.as_bytes())
            }
            Err(errno) => {
                log::error!(
                    "kernel speaks FUSE {}.{}; coro-fuse needs 7.{} or newer",
                    init.major,
                    init.minor,
                    reply::MIN_SUPPORTED_MINOR
                );
                Response::Err(errno)
            }
        }
    }

    fn statfs(&self) -> Response {
        let size = self.files.first().map_or(0, |f| self.size_of(f.extent()));
        let out = fuse_statfs_out {
            st: fuse_kstatfs {
                blocks: size.div_ceil(512),
                bfree: 0,
                bavail: 0,
                files: 1,
                ffree: 0,
                bsize: 512,
                namelen: 255,
                frsize: 512,
                padding: 0,
                spare: [0; 6],
            },
        };
        Response::bytes(reply::statfs_out_bytes(&out, self.minor()))
    }

    /// Attributes of inode `ino`, or `None` if there is no such inode.
    fn attr(&self, ino: u64) -> Option<fuse_attr> {
        let t = self.changed.load(Ordering::Relaxed);
        // The directory has the image's owner.
        let a = self.files.first()?.attrs();
        let mut attr = fuse_attr {
            ino,
            atime: t,
            mtime: t,
            ctime: t,
            nlink: 1,
            uid: a.uid,
            gid: a.gid,
            blksize: 512,
            ..Default::default()
        };
        if let Some(f) = self.file(ino) {
            let a = f.attrs();
            let size = self.size_of(f.extent());
            (attr.mode, attr.uid, attr.gid) = (a.mode, a.uid, a.gid);
            attr.size = size;
            attr.blocks = size.div_ceil(512);
        } else if self.is_dir(ino) {
            let perm = if self.cfg.allow_other { 0o555 } else { 0o500 };
            attr.mode = libc::S_IFDIR | perm;
            attr.nlink = 2;
        } else {
            return None;
        }
        Some(attr)
    }

    fn attr_reply(&self, ino: u64) -> Response {
        match self.attr(ino) {
            Some(attr) => {
                let out = fuse_attr_out {
                    attr_valid: ATTR_VALID_SECS,
                    attr_valid_nsec: 0,
                    dummy: 0,
                    attr,
                };
                Response::bytes(reply::attr_out_bytes(&out, self.minor()))
            }
            None => Response::Err(libc::ENOENT),
        }
    }

    fn getattr(&self, nodeid: u64) -> Response {
        self.attr_reply(nodeid)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Response {
        if !self.is_dir(parent) {
            return Response::Err(libc::ENOENT);
        }
        let Some(index) = self.files.iter().position(|f| f.name.as_bytes() == name) else {
            return Response::Err(libc::ENOENT);
        };
        let ino = self.ino_of(index);
        let Some(attr) = self.attr(ino) else {
            return Response::Err(libc::ENOENT);
        };
        let out = fuse_entry_out {
            nodeid: ino,
            generation: 0,
            entry_valid: ATTR_VALID_SECS,
            attr_valid: ATTR_VALID_SECS,
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr,
        };
        Response::bytes(reply::entry_out_bytes(&out, self.minor()))
    }

    fn readdir(&self, arg: &fuse_read_in) -> Response {
        let dots: [(u64, &[u8], u32); 2] = [
            (1, b".", libc::DT_DIR as u32),
            (1, b"..", libc::DT_DIR as u32),
        ];
        let files = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (self.ino_of(i), f.name.as_bytes(), libc::DT_REG as u32));
        let entries = dots.into_iter().chain(files);
        let skip = usize::try_from(arg.offset).unwrap_or(usize::MAX);
        let mut buf = Vec::new();
        for (i, (ino, name, typ)) in entries.enumerate().skip(skip) {
            let rec = fuse_dirent_size(name.len());
            if buf.len() + rec > arg.size as usize {
                break;
            }
            let d = fuse_dirent {
                ino,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                r#type: typ,
            };
            buf.extend_from_slice(d.as_bytes());
            buf.extend_from_slice(name);
            buf.resize(buf.len() + (rec - FUSE_NAME_OFFSET - name.len()), 0);
        }
        let len = buf.len();
        Response::Data(Buf::Small(buf), len)
    }

    fn open(&self, nodeid: u64) -> Response {
        if self.file(nodeid).is_none() {
            return Response::Err(libc::EISDIR);
        }
        let out = fuse_open_out {
            fh: 0,
            open_flags: FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
            backing_id: 0,
        };
        Response::bytes(out.as_bytes())
    }

    fn plan_setattr<'a>(&self, nodeid: u64, arg: &'a fuse_setattr_in) -> Step<'a> {
        let Some(file) = self.file(nodeid) else {
            return Step::Done(Response::Err(libc::EPERM));
        };
        // The file handle and lock owner only say who asks; libfuse drops them as well.
        let to_set = arg.valid & !(FATTR_FH | FATTR_LOCKOWNER);
        let mut supported = FATTR_SIZE | FATTR_MODE;
        if self.cfg.allow_other {
            supported |= FATTR_UID | FATTR_GID;
        }
        if to_set & !supported != 0 {
            return Step::Done(Response::Err(libc::ENOTSUP));
        }
        if to_set & FATTR_MODE != 0 {
            // Without allow_other nobody else can reach the file: refuse to pretend otherwise.
            if !self.cfg.allow_other && arg.mode & (libc::S_IRWXG | libc::S_IRWXO) != 0 {
                return Step::Done(Response::Err(libc::EPERM));
            }
            if !self.cfg.writable && arg.mode & (libc::S_IWUSR | libc::S_IWGRP | libc::S_IWOTH) != 0
            {
                return Step::Done(Response::Err(libc::EROFS));
            }
        }
        if to_set & FATTR_SIZE != 0 {
            if !self.cfg.writable {
                return Step::Done(Response::Err(libc::EACCES));
            }
            if let Some(w) = file.window {
                // A partition keeps its size, as its block device would (truncate: EINVAL).
                if arg.size != w.size {
                    return Step::Done(Response::Err(libc::EINVAL));
                }
                return Step::Done(self.setattr_finish(nodeid, arg, to_set & !FATTR_SIZE, Ok(())));
            }
            if arg.size < self.partitions_end {
                // Exported partitions would reach past the end.
                return Step::Done(Response::Err(libc::EBUSY));
            }
            return Step::Io(Io::Truncate {
                nodeid,
                arg,
                to_set,
            });
        }
        Step::Done(self.setattr_finish(nodeid, arg, to_set, Ok(())))
    }

    /// After the truncate (if any): applies mode and ownership and replies with the attributes.
    fn setattr_finish(
        &self,
        nodeid: u64,
        arg: &fuse_setattr_in,
        to_set: u32,
        truncated: block::Result<()>,
    ) -> Response {
        if let Err(e) = truncated {
            return Response::Err(errno_of(&e));
        }
        if to_set & FATTR_SIZE != 0 {
            self.touch();
        }
        if let Some(file) = self.file(nodeid) {
            let mut a = file.attrs.lock().unwrap_or_else(|e| e.into_inner());
            if to_set & FATTR_MODE != 0 {
                a.mode = (arg.mode & 0o7777) | libc::S_IFREG;
            }
            if to_set & FATTR_UID != 0 {
                a.uid = arg.uid;
            }
            if to_set & FATTR_GID != 0 {
                a.gid = arg.gid;
            }
        }
        self.attr_reply(nodeid)
    }

    fn plan_read(&self, nodeid: u64, arg: &fuse_read_in) -> Step<'static> {
        let Some(file) = self.file(nodeid) else {
            return Step::Done(Response::Err(libc::EISDIR));
        };
        let extent = file.extent();
        let size = self.size_of(extent);
        if arg.offset >= size {
            return Step::Done(Response::ok());
        }
        let len = (size - arg.offset).min(u64::from(arg.size)) as usize;
        Step::Io(Io::Read {
            offset: extent.base + arg.offset,
            len,
        })
    }

    fn write_out(size: u32) -> Response {
        Response::bytes(fuse_write_out { size, padding: 0 }.as_bytes())
    }

    fn plan_write<'a>(&self, nodeid: u64, arg: &fuse_write_in, data: &'a [u8]) -> Step<'a> {
        let Some(file) = self.file(nodeid) else {
            return Step::Done(Response::Err(libc::EISDIR));
        };
        if !self.cfg.writable {
            return Step::Done(Response::Err(libc::EACCES));
        }
        let Some(end) = arg.offset.checked_add(data.len() as u64) else {
            return Step::Done(Response::Err(libc::EINVAL));
        };
        let mut len = data.len();
        let mut grow_to = None;
        let extent = file.extent();
        let size = self.size_of(extent);
        if end > size {
            // A partition never grows: its end is the next partition's start.
            if self.cfg.growable && extent.fixed.is_none() {
                grow_to = Some(end);
            } else {
                if arg.offset >= size {
                    return Step::Done(Self::write_out(0));
                }
                len = (size - arg.offset) as usize;
            }
        }
        Step::Io(Io::Write {
            offset: extent.base + arg.offset,
            data: &data[..len],
            grow_to,
        })
    }

    fn write_finish(&self, offset: u64, len: usize, r: block::Result<()>) -> Response {
        match r {
            Ok(()) => {
                self.touch();
                Self::write_out(len as u32)
            }
            Err(e) => {
                log::debug!("write {offset}+{len}: {e}");
                Response::Err(errno_of(&e))
            }
        }
    }

    /// The size that growing to `end` makes: `end` rounded up to
    /// [`BlockBackend::size_granularity`]. qcow2 keeps sectors (QEMU reads its header size as
    /// `size / 512`), so growing to a byte end would be acknowledged and then lose the tail of
    /// the write at the next open; rounded up, the data is kept and zeros follow it, and the
    /// size a client sees is the size a restart shows. (qemu-storage-daemon refuses such a
    /// write with EINVAL instead.) A raw file keeps bytes and grows to `end` exactly.
    fn grown_size(&self, end: u64) -> block::Result<u64> {
        let g = self.blk.size_granularity();
        end.checked_next_multiple_of(g)
            .ok_or_else(|| block::BlockError::Invalid(format!("growing to {end} bytes overflows")))
    }

    fn plan_fallocate(&self, nodeid: u64, arg: &fuse_fallocate_in) -> Step<'static> {
        let Some(file) = self.file(nodeid) else {
            return Step::Done(Response::Err(libc::EISDIR));
        };
        if !self.cfg.writable {
            return Step::Done(Response::Err(libc::EACCES));
        }
        let extent = file.extent();
        let size = self.size_of(extent);
        let (offset, mut length, mode) = (arg.offset, arg.length, arg.mode);
        let Some(end) = offset.checked_add(length) else {
            return Step::Done(Response::Err(libc::EINVAL));
        };
        if mode & FALLOC_FL_KEEP_SIZE != 0 {
            length = length.min(size.saturating_sub(offset));
        }
        let zero = |unmap| (length != 0).then_some((extent.base + offset, length, unmap));
        let (grow_to, zero) = if mode == 0 {
            // Only allocation at or after EOF can be expressed: a grow, then the new range is
            // written as zeros (QEMU: truncate with PREALLOC_MODE_FALLOC). On a raw file that
            // allocates; a format that can (qcow2 v3) records zero clusters instead.
            if offset < size {
                return Step::Done(Response::Err(libc::EOPNOTSUPP));
            }
            (Some(end), zero(false))
        } else if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            if mode & FALLOC_FL_KEEP_SIZE == 0 {
                return Step::Done(Response::Err(libc::EINVAL));
            }
            (None, zero(true))
        } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
            let grow = mode & FALLOC_FL_KEEP_SIZE == 0 && end > size;
            (grow.then_some(end), zero(false))
        } else {
            return Step::Done(Response::Err(libc::EOPNOTSUPP));
        };
        if grow_to.is_some() && extent.fixed.is_some() {
            // A partition cannot grow (as fallocate past the end of a block device).
            return Step::Done(Response::Err(libc::ENOSPC));
        }
        Step::Io(Io::Fallocate { grow_to, zero })
    }

    fn fallocate_finish(&self, r: block::Result<()>) -> Response {
        match r {
            Ok(()) => {
                self.touch();
                Response::ok()
            }
            Err(e) => Response::Err(match e.errno() {
                libc::ENOTSUP => libc::EOPNOTSUPP,
                n => n,
            }),
        }
    }

    fn plan_lseek(&self, nodeid: u64, arg: &fuse_lseek_in) -> Step<'static> {
        let Some(file) = self.file(nodeid) else {
            return Step::Done(Response::Err(libc::EISDIR));
        };
        let whence = arg.whence as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Step::Done(Response::Err(libc::EINVAL));
        }
        Step::Io(Io::Lseek {
            whence,
            offset: arg.offset,
            extent: file.extent(),
        })
    }
}

/// What a request needs after its pure part: nothing more (the reply is known) or I/O.
enum Step<'a> {
    Done(Response),
    Io(Io<'a>),
}

/// The I/O part of a request: the only part of the handlers that exists once per engine
/// ([`Export::co_io`], [`Export::io_async`]). Everything before it is `Export::plan`'s,
/// everything after it a shared `*_finish` function.
enum Io<'a> {
    /// Read `len` bytes (already clamped at EOF).
    Read {
        offset: u64,
        len: usize,
    },
    /// Grow first if asked, then write `data` (already clamped at EOF).
    Write {
        offset: u64,
        data: &'a [u8],
        grow_to: Option<u64>,
    },
    /// Grow first if asked, then write zeroes `(offset, len, may_unmap)` if asked.
    Fallocate {
        grow_to: Option<u64>,
        zero: Option<(u64, u64, bool)>,
    },
    /// SETATTR with a size: truncate under the resize lock, then apply the rest.
    Truncate {
        nodeid: u64,
        arg: &'a fuse_setattr_in,
        to_set: u32,
    },
    Flush,
    /// SEEK_DATA/SEEK_HOLE from `offset` of the file at `extent` (offsets in the reply are
    /// the file's): block-status queries until the answer is known.
    Lseek {
        whence: i32,
        offset: u64,
        extent: Extent,
    },
}

/// Go on with a value, or answer the request now (a reply, not an error: hence no `Result`).
enum Then<T> {
    Go(T),
    Reply(Response),
}

/// A READ reply buffer of `len` bytes, or the ENOMEM reply.
fn read_buffer(len: usize) -> Then<Buf> {
    match buf::take(len) {
        Ok(b) => Then::Go(b),
        Err(e) => {
            log::error!("no memory for a {len}-byte read buffer: {e}");
            Then::Reply(Response::Err(libc::ENOMEM))
        }
    }
}

fn read_finish(data: Buf, len: usize, offset: u64, r: block::Result<()>) -> Response {
    match r {
        Ok(()) => Response::Data(data, len),
        Err(e) => {
            buf::give_back(data);
            log::debug!("read {offset}+{len}: {e}");
            Response::Err(errno_of(&e))
        }
    }
}

/// [`read_finish`] for a read into the transport's own buffer.
fn read_in_place_finish(len: usize, offset: u64, r: block::Result<()>) -> Response {
    match r {
        Ok(()) => Response::InPlace(len),
        Err(e) => {
            log::debug!("read {offset}+{len}: {e}");
            Response::Err(errno_of(&e))
        }
    }
}

fn flush_finish(r: block::Result<()>) -> Response {
    match r {
        Ok(()) => Response::ok(),
        Err(e) => Response::Err(errno_of(&e)),
    }
}

/// One LSEEK round, before the query: the reply if `offset` is at or past EOF (the end of the
/// file is a hole), else how many bytes to ask the block status of.
fn seek_check(whence: i32, offset: u64, size: u64) -> Then<u64> {
    if offset < size {
        return Then::Go(size - offset);
    }
    Then::Reply(if offset > size || whence == libc::SEEK_DATA {
        Response::Err(libc::ENXIO)
    } else {
        Response::bytes(fuse_lseek_out { offset }.as_bytes())
    })
}

/// One LSEEK round, after the query: the reply if this extent answers it, else the offset of
/// the next extent.
fn seek_next(whence: i32, offset: u64, status: block::Result<(BlockStatus, u64)>) -> Then<u64> {
    let (status, n) = match status {
        Ok(s) => s,
        Err(e) => return Then::Reply(Response::Err(errno_of(&e))),
    };
    let is_data = status == BlockStatus::Data;
    if is_data == (whence == libc::SEEK_DATA) {
        return Then::Reply(Response::bytes(fuse_lseek_out { offset }.as_bytes()));
    }
    if n == 0 {
        return Then::Reply(Response::Err(libc::ENXIO)); // no progress: refuse to loop forever
    }
    Then::Go(offset + n)
}

#[cfg(test)]
mod tests {
    //! The two engines' handlers give byte-identical replies to the same request sequence.

    use super::*;
    use crate::protocol::request::Request;
    use block::{open_image, OpenOptions};

    fn header(opcode: u32, unique: u64) -> fuse_in_header {
        fuse_in_header {
            opcode,
            unique,
            nodeid: FUSE_ROOT_ID,
            ..Default::default()
        }
    }

    /// A response as (kind, bytes), comparable across engines.
    fn encode(resp: Response) -> (u8, Vec<u8>) {
        match resp {
            Response::None => (0, Vec::new()),
            Response::Err(e) => (1, e.to_ne_bytes().to_vec()),
            Response::Bytes(b) => (2, b.to_vec()),
            Response::Data(data, len) => {
                let v = data[..len].to_vec();
                buf::give_back(data);
                (3, v)
            }
            Response::InPlace(_) => panic!("no buffer was lent"),
        }
    }

    fn export(dir: &std::path::Path, name: &str, growable: bool) -> Export {
        let path = dir.join(name);
        let mut data = vec![0u8; 256 * 1024];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        data[64 * 1024..128 * 1024].fill(0);
        std::fs::write(&path, &data).expect("image");
        let blk = open_image(&path, &OpenOptions::default()).expect("open");
        Export::new(
            blk,
            ExportConfig {
                writable: true,
                growable,
                allow_other: false,
                dir_entry: None,
                window: None,
                partitions: Vec::new(),
                init: InitConfig::default(),
            },
        )
    }

    /// Every opcode with I/O, at the interesting offsets (inside, across and past EOF).
    fn requests(data: &[u8]) -> Vec<Request<'_>> {
        let size = 256 * 1024u64;
        let mut v = Vec::new();
        let mut unique = 1;
        let mut push = |opcode, op| {
            v.push(Request {
                header: header(opcode, unique),
                op,
            });
            unique += 1;
        };
        for offset in [0, 4096, size - 100, size, size + 4096] {
            let read = fuse_read_in {
                offset,
                size: 8192,
                ..Default::default()
            };
            push(FUSE_READ, Operation::Read(read));
            let write = fuse_write_in {
                offset,
                size: data.len() as u32,
                ..Default::default()
            };
            push(FUSE_WRITE, Operation::Write { arg: write, data });
            push(FUSE_READ, Operation::Read(read));
        }
        for (mode, offset, length) in [
            (0, size + 8192, 4096),
            (0, 0, 4096),
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192),
            (FALLOC_FL_PUNCH_HOLE, 4096, 8192),
            (FALLOC_FL_ZERO_RANGE, size - 4096, 16384),
            (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096),
            (0x40, 0, 4096),
        ] {
            let arg = fuse_fallocate_in {
                offset,
                length,
                mode,
                ..Default::default()
            };
            push(FUSE_FALLOCATE, Operation::Fallocate(arg));
        }
        for (whence, offset) in [
            (libc::SEEK_DATA, 0),
            (libc::SEEK_HOLE, 0),
            (libc::SEEK_DATA, 70 * 1024),
            (libc::SEEK_HOLE, size * 4),
            (libc::SEEK_SET, 0),
        ] {
            let arg = fuse_lseek_in {
                offset,
                whence: whence as u32,
                ..Default::default()
            };
            push(FUSE_LSEEK, Operation::Lseek(arg));
        }
        let truncate = fuse_setattr_in {
            valid: FATTR_SIZE,
            size: 100_000,
            ..Default::default()
        };
        push(FUSE_SETATTR, Operation::Setattr(truncate));
        push(FUSE_FSYNC, Operation::Fsync(Default::default()));
        let read = fuse_read_in {
            offset: 90_000,
            size: 65536,
            ..Default::default()
        };
        push(FUSE_READ, Operation::Read(read));
        v
    }

    #[test]
    fn coroutine_and_async_handlers_reply_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..12_345u32).map(|i| (i * 7) as u8).collect();
        let mut kinds = [0usize; 4];
        for growable in [false, true] {
            let co = std::sync::Arc::new(export(dir.path(), "co.img", growable));
            let fut = export(dir.path(), "async.img", growable);
            let reqs = requests(&data);
            for req in &reqs {
                // Attributes carry a timestamp; compare the size through GETATTR separately.
                let c = {
                    let e = co.clone();
                    // The coroutine engine: the request in a coroutine, as transport/dev.rs runs it.
                    let (h, op) = (req.header, req_op_clone(&req.op));
                    runtime::spawn(move || encode(e.co_handle(&Request { header: h, op })))
                        .join()
                        .expect("no panic")
                };
                let a = runtime::block_on(fut.handle_async(req));
                let a = encode(a);
                kinds[usize::from(a.0)] += 1;
                if req.header.opcode == FUSE_SETATTR {
                    assert_eq!(c.0, a.0, "SETATTR kind");
                } else {
                    assert_eq!(
                        c,
                        a,
                        "request {} (opcode {})",
                        req.unique(),
                        req.header.opcode
                    );
                }
                assert_eq!(co.blk().size(), fut.blk().size());
            }
        }
        // The sequence exercised data replies, errors and small replies in both modes.
        assert!(kinds[1] > 0 && kinds[2] > 0 && kinds[3] > 0, "{kinds:?}");
    }

    /// `Operation` borrows; the coroutine needs `'static` data, so the one variant with a
    /// borrow (WRITE) gets a leaked copy (a test, a few KiB).
    fn req_op_clone(op: &Operation<'_>) -> Operation<'static> {
        match *op {
            Operation::Read(a) => Operation::Read(a),
            Operation::Write { arg, data } => Operation::Write {
                arg,
                data: Box::leak(data.to_vec().into_boxed_slice()),
            },
            Operation::Fallocate(a) => Operation::Fallocate(a),
            Operation::Lseek(a) => Operation::Lseek(a),
            Operation::Setattr(a) => Operation::Setattr(a),
            Operation::Fsync(a) => Operation::Fsync(a),
            _ => Operation::Unknown(0),
        }
    }
}
