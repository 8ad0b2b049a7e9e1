//! The FUSE kernel wire format: `#[repr(C)]` structs, opcodes and flag bits.
//!
//! This module owns our copy of the kernel ABI. It mirrors the Linux header
//! `include/uapi/linux/fuse.h` at protocol 7.45 (the role `standard-headers/linux/fuse.h`
//! plays for QEMU's `block/export/fuse.c`). Everything here is native endian, as on the
//! wire of `/dev/fuse`.
//!
//! # Conventions
//!
//! - Types and constants keep the kernel's names (`fuse_in_header`, `FUSE_INIT`, …), so that
//!   the kernel header, QEMU, libfuse and this file can be read side by side. That is why
//!   the module allows `non_camel_case_types`.
//! - Every struct derives the zerocopy traits for *both* directions (`FromBytes` and
//!   `IntoBytes`): the parser reads requests with `read_from_prefix` (a copy, so a buffer of
//!   any alignment works and no `unsafe` is needed), replies are written with `as_bytes`,
//!   and the tests build requests and decode replies with the same types. The `IntoBytes`
//!   derive also proves at compile time that no struct has padding.
//! - Every size is pinned with `const _: () = assert!(..)` against the 7.45 header, and the
//!   kernel's `FUSE_COMPAT_*` sizes are pinned against field offsets, which proves that an
//!   old layout is a prefix of the current one.
//! - Sizes that changed with the protocol minor are data: a [`SizeByMinor`] table per
//!   struct, read through functions such as [`init_out_size`] and [`entry_out_size`]. No
//!   handler branches on the minor version itself.
//! - Flag words of the INIT handshake are `u64` here: bits 32..63 travel in the `flags2`
//!   field when `FUSE_INIT_EXT` is negotiated, exactly as the kernel header describes.
//!
//! Only the structs this export uses are defined; `fuse_notify_*`, locks, xattrs, ioctl,
//! and statx structures are left out on purpose. The FUSE-over-io_uring structures (7.42) are
//! here for `crate::uring_transport`.
#![allow(non_camel_case_types)]

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

// ---------------------------------------------------------------------------------------
// Versions and general constants
// ---------------------------------------------------------------------------------------

/// Major protocol version this file describes.
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// Minor protocol version this file describes (Linux 6.18's header).
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 45;
/// The node id of the root inode.
pub const FUSE_ROOT_ID: u64 = 1;
/// The read buffer handed to `/dev/fuse` must be at least this large (and at least
/// `sizeof(fuse_in_header) + sizeof(fuse_write_in) + max_write`).
pub const FUSE_MIN_READ_BUFFER: usize = 8192;

/// Pages per request the kernel uses when `FUSE_MAX_PAGES` is not negotiated.
///
/// Not in the uapi header: `FUSE_DEFAULT_MAX_PAGES_PER_REQ` in the kernel's `fs/fuse/fuse_i.h`.
pub const FUSE_DEFAULT_MAX_PAGES_PER_REQ: u16 = 32;

// ---------------------------------------------------------------------------------------
// Opcodes (`enum fuse_opcode`)
// ---------------------------------------------------------------------------------------

/// Look up a directory entry by name.
pub const FUSE_LOOKUP: u32 = 1;
/// Drop lookup references of one inode; no reply.
pub const FUSE_FORGET: u32 = 2;
/// Get file attributes.
pub const FUSE_GETATTR: u32 = 3;
/// Set file attributes.
pub const FUSE_SETATTR: u32 = 4;
/// Read a symbolic link.
pub const FUSE_READLINK: u32 = 5;
/// Create a symbolic link.
pub const FUSE_SYMLINK: u32 = 6;
/// Create a special file.
pub const FUSE_MKNOD: u32 = 8;
/// Create a directory.
pub const FUSE_MKDIR: u32 = 9;
/// Remove a file.
pub const FUSE_UNLINK: u32 = 10;
/// Remove a directory.
pub const FUSE_RMDIR: u32 = 11;
/// Rename.
pub const FUSE_RENAME: u32 = 12;
/// Create a hard link.
pub const FUSE_LINK: u32 = 13;
/// Open a file.
pub const FUSE_OPEN: u32 = 14;
/// Read from an open file.
pub const FUSE_READ: u32 = 15;
/// Write to an open file.
pub const FUSE_WRITE: u32 = 16;
/// File system statistics.
pub const FUSE_STATFS: u32 = 17;
/// Close an open file (last reference).
pub const FUSE_RELEASE: u32 = 18;
/// Synchronise file contents.
pub const FUSE_FSYNC: u32 = 20;
/// Set an extended attribute.
pub const FUSE_SETXATTR: u32 = 21;
/// Get an extended attribute.
pub const FUSE_GETXATTR: u32 = 22;
/// List extended attributes.
pub const FUSE_LISTXATTR: u32 = 23;
/// Remove an extended attribute.
pub const FUSE_REMOVEXATTR: u32 = 24;
/// `close(2)` of one file descriptor.
pub const FUSE_FLUSH: u32 = 25;
/// Protocol handshake; the first request of a session.
pub const FUSE_INIT: u32 = 26;
/// Open a directory.
pub const FUSE_OPENDIR: u32 = 27;
/// Read directory entries.
pub const FUSE_READDIR: u32 = 28;
/// Close an open directory.
pub const FUSE_RELEASEDIR: u32 = 29;
/// Synchronise a directory.
pub const FUSE_FSYNCDIR: u32 = 30;
/// Test for a POSIX lock.
pub const FUSE_GETLK: u32 = 31;
/// Take a POSIX lock.
pub const FUSE_SETLK: u32 = 32;
/// Take a POSIX lock, waiting.
pub const FUSE_SETLKW: u32 = 33;
/// Check access permissions.
pub const FUSE_ACCESS: u32 = 34;
/// Create and open a file.
pub const FUSE_CREATE: u32 = 35;
/// Interrupt an outstanding request; no reply expected.
pub const FUSE_INTERRUPT: u32 = 36;
/// Map a file block to a device block.
pub const FUSE_BMAP: u32 = 37;
/// Tear down the session (sent at unmount).
pub const FUSE_DESTROY: u32 = 38;
/// ioctl(2).
pub const FUSE_IOCTL: u32 = 39;
/// poll(2).
pub const FUSE_POLL: u32 = 40;
/// Reply to a retrieve notification.
pub const FUSE_NOTIFY_REPLY: u32 = 41;
/// FORGET for many inodes at once; no reply.
pub const FUSE_BATCH_FORGET: u32 = 42;
/// fallocate(2).
pub const FUSE_FALLOCATE: u32 = 43;
/// READDIR plus the attributes of each entry.
pub const FUSE_READDIRPLUS: u32 = 44;
/// rename with flags.
pub const FUSE_RENAME2: u32 = 45;
/// lseek(2) for SEEK_DATA / SEEK_HOLE.
pub const FUSE_LSEEK: u32 = 46;
/// copy_file_range(2).
pub const FUSE_COPY_FILE_RANGE: u32 = 47;
/// DAX: set up a mapping.
pub const FUSE_SETUPMAPPING: u32 = 48;
/// DAX: remove a mapping.
pub const FUSE_REMOVEMAPPING: u32 = 49;
/// syncfs(2).
pub const FUSE_SYNCFS: u32 = 50;
/// Create an unnamed temporary file.
pub const FUSE_TMPFILE: u32 = 51;
/// statx(2).
pub const FUSE_STATX: u32 = 52;
/// copy_file_range(2) with a 64-bit result (7.45).
pub const FUSE_COPY_FILE_RANGE_64: u32 = 53;
/// CUSE handshake.
pub const CUSE_INIT: u32 = 4096;

/// The kernel's name for an opcode, for logs (`None` for numbers it does not define).
pub fn opcode_name(opcode: u32) -> Option<&'static str> {
    Some(match opcode {
        FUSE_LOOKUP => "LOOKUP",
        FUSE_FORGET => "FORGET",
        FUSE_GETATTR => "GETATTR",
        FUSE_SETATTR => "SETATTR",
        FUSE_READLINK => "READLINK",
        FUSE_SYMLINK => "SYMLINK",
        FUSE_MKNOD => "MKNOD",
        FUSE_MKDIR => "MKDIR",
        FUSE_UNLINK => "UNLINK",
        FUSE_RMDIR => "RMDIR",
        FUSE_RENAME => "RENAME",
        FUSE_LINK => "LINK",
        FUSE_OPEN => "OPEN",
        FUSE_READ => "READ",
        FUSE_WRITE => "WRITE",
        FUSE_STATFS => "STATFS",
        FUSE_RELEASE => "RELEASE",
        FUSE_FSYNC => "FSYNC",
        FUSE_SETXATTR => "SETXATTR",
        FUSE_GETXATTR => "GETXATTR",
        FUSE_LISTXATTR => "LISTXATTR",
        FUSE_REMOVEXATTR => "REMOVEXATTR",
        FUSE_FLUSH => "FLUSH",
        FUSE_INIT => "INIT",
        FUSE_OPENDIR => "OPENDIR",
        FUSE_READDIR => "READDIR",
        FUSE_RELEASEDIR => "RELEASEDIR",
        FUSE_FSYNCDIR => "FSYNCDIR",
        FUSE_GETLK => "GETLK",
        FUSE_SETLK => "SETLK",
        FUSE_SETLKW => "SETLKW",
        FUSE_ACCESS => "ACCESS",
        FUSE_CREATE => "CREATE",
        FUSE_INTERRUPT => "INTERRUPT",
        FUSE_BMAP => "BMAP",
        FUSE_DESTROY => "DESTROY",
        FUSE_IOCTL => "IOCTL",
        FUSE_POLL => "POLL",
        FUSE_NOTIFY_REPLY => "NOTIFY_REPLY",
        FUSE_BATCH_FORGET => "BATCH_FORGET",
        FUSE_FALLOCATE => "FALLOCATE",
        FUSE_READDIRPLUS => "READDIRPLUS",
        FUSE_RENAME2 => "RENAME2",
        FUSE_LSEEK => "LSEEK",
        FUSE_COPY_FILE_RANGE => "COPY_FILE_RANGE",
        FUSE_SETUPMAPPING => "SETUPMAPPING",
        FUSE_REMOVEMAPPING => "REMOVEMAPPING",
        FUSE_SYNCFS => "SYNCFS",
        FUSE_TMPFILE => "TMPFILE",
        FUSE_STATX => "STATX",
        FUSE_COPY_FILE_RANGE_64 => "COPY_FILE_RANGE_64",
        CUSE_INIT => "CUSE_INIT",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// INIT flags (`fuse_init_in.flags` / `fuse_init_out.flags`, bits 32.. in `flags2`)
// ---------------------------------------------------------------------------------------

/// Asynchronous read requests.
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
/// Remote locking for POSIX file locks.
pub const FUSE_POSIX_LOCKS: u64 = 1 << 1;
/// Kernel sends file handle for fstat, etc. (not yet supported).
pub const FUSE_FILE_OPS: u64 = 1 << 2;
/// The file system handles the O_TRUNC open flag.
pub const FUSE_ATOMIC_O_TRUNC: u64 = 1 << 3;
/// The file system handles lookups of "." and "..".
pub const FUSE_EXPORT_SUPPORT: u64 = 1 << 4;
/// The file system can handle writes larger than 4 KiB.
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
/// Don't apply umask to file mode on create operations.
pub const FUSE_DONT_MASK: u64 = 1 << 6;
/// Kernel supports splice write on the device.
pub const FUSE_SPLICE_WRITE: u64 = 1 << 7;
/// Kernel supports splice move on the device.
pub const FUSE_SPLICE_MOVE: u64 = 1 << 8;
/// Kernel supports splice read on the device.
pub const FUSE_SPLICE_READ: u64 = 1 << 9;
/// Remote locking for BSD style file locks.
pub const FUSE_FLOCK_LOCKS: u64 = 1 << 10;
/// Kernel supports ioctl on directories.
pub const FUSE_HAS_IOCTL_DIR: u64 = 1 << 11;
/// Automatically invalidate cached pages.
pub const FUSE_AUTO_INVAL_DATA: u64 = 1 << 12;
/// Do READDIRPLUS (READDIR+LOOKUP in one).
pub const FUSE_DO_READDIRPLUS: u64 = 1 << 13;
/// Adaptive READDIRPLUS.
pub const FUSE_READDIRPLUS_AUTO: u64 = 1 << 14;
/// Asynchronous direct I/O submission.
pub const FUSE_ASYNC_DIO: u64 = 1 << 15;
/// Use writeback cache for buffered writes.
pub const FUSE_WRITEBACK_CACHE: u64 = 1 << 16;
/// Kernel supports zero-message opens.
pub const FUSE_NO_OPEN_SUPPORT: u64 = 1 << 17;
/// Allow parallel lookups and readdir.
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
/// The file system handles killing suid/sgid/cap on write/chown/trunc.
pub const FUSE_HANDLE_KILLPRIV: u64 = 1 << 19;
/// The file system supports POSIX ACLs.
pub const FUSE_POSIX_ACL: u64 = 1 << 20;
/// Reading the device after abort returns ECONNABORTED.
pub const FUSE_ABORT_ERROR: u64 = 1 << 21;
/// `fuse_init_out.max_pages` contains the max number of pages per request.
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
/// Cache READLINK responses.
pub const FUSE_CACHE_SYMLINKS: u64 = 1 << 23;
/// Kernel supports zero-message opendir.
pub const FUSE_NO_OPENDIR_SUPPORT: u64 = 1 << 24;
/// Only invalidate cached pages on explicit request.
pub const FUSE_EXPLICIT_INVAL_DATA: u64 = 1 << 25;
/// `fuse_init_out.map_alignment` contains log2(byte alignment) for DAX mappings.
pub const FUSE_MAP_ALIGNMENT: u64 = 1 << 26;
/// Kernel supports auto-mounting directory submounts.
pub const FUSE_SUBMOUNTS: u64 = 1 << 27;
/// The file system handles killing suid/sgid/cap, v2.
pub const FUSE_HANDLE_KILLPRIV_V2: u64 = 1 << 28;
/// The server supports the extended `fuse_setxattr_in`.
pub const FUSE_SETXATTR_EXT: u64 = 1 << 29;
/// Extended `fuse_init_in`/`fuse_init_out`: `flags2` is valid (7.36).
pub const FUSE_INIT_EXT: u64 = 1 << 30;
/// Reserved, do not use.
pub const FUSE_INIT_RESERVED: u64 = 1 << 31;
/// Add security context to create, mkdir, symlink and mknod (first `flags2` bit).
pub const FUSE_SECURITY_CTX: u64 = 1 << 32;
/// Use per-inode DAX.
pub const FUSE_HAS_INODE_DAX: u64 = 1 << 33;
/// Add supplementary group info to create, mkdir, symlink and mknod.
pub const FUSE_CREATE_SUPP_GROUP: u64 = 1 << 34;
/// Kernel supports expiry-only entry invalidation.
pub const FUSE_HAS_EXPIRE_ONLY: u64 = 1 << 35;
/// Allow shared mmap in FOPEN_DIRECT_IO mode.
pub const FUSE_DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
/// Passthrough mode.
pub const FUSE_PASSTHROUGH: u64 = 1 << 37;
/// Explicitly disable export support.
pub const FUSE_NO_EXPORT_SUPPORT: u64 = 1 << 38;
/// Kernel supports resending pending requests.
pub const FUSE_HAS_RESEND: u64 = 1 << 39;
/// Allow creation of idmapped mounts.
pub const FUSE_ALLOW_IDMAP: u64 = 1 << 40;
/// The server supports FUSE over io_uring.
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;
/// Kernel supports timing out requests.
pub const FUSE_REQUEST_TIMEOUT: u64 = 1 << 42;

// ---------------------------------------------------------------------------------------
// Other flag words
// ---------------------------------------------------------------------------------------

/// `fuse_setattr_in.valid`: set mode.
pub const FATTR_MODE: u32 = 1 << 0;
/// `fuse_setattr_in.valid`: set user id.
pub const FATTR_UID: u32 = 1 << 1;
/// `fuse_setattr_in.valid`: set group id.
pub const FATTR_GID: u32 = 1 << 2;
/// `fuse_setattr_in.valid`: set size (truncate).
pub const FATTR_SIZE: u32 = 1 << 3;
/// `fuse_setattr_in.valid`: set access time.
pub const FATTR_ATIME: u32 = 1 << 4;
/// `fuse_setattr_in.valid`: set modification time.
pub const FATTR_MTIME: u32 = 1 << 5;
/// `fuse_setattr_in.valid`: `fh` is valid.
pub const FATTR_FH: u32 = 1 << 6;
/// `fuse_setattr_in.valid`: set access time to now.
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
/// `fuse_setattr_in.valid`: set modification time to now.
pub const FATTR_MTIME_NOW: u32 = 1 << 8;
/// `fuse_setattr_in.valid`: `lock_owner` is valid.
pub const FATTR_LOCKOWNER: u32 = 1 << 9;
/// `fuse_setattr_in.valid`: set change time.
pub const FATTR_CTIME: u32 = 1 << 10;
/// `fuse_setattr_in.valid`: kill suid/sgid bits.
pub const FATTR_KILL_SUIDGID: u32 = 1 << 11;

/// `fuse_open_out.open_flags`: bypass the page cache for this open file.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `fuse_open_out.open_flags`: don't invalidate the data cache on open.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// `fuse_open_out.open_flags`: the file is not seekable.
pub const FOPEN_NONSEEKABLE: u32 = 1 << 2;
/// `fuse_open_out.open_flags`: allow caching this directory.
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;
/// `fuse_open_out.open_flags`: the file is stream-like (no file position at all).
pub const FOPEN_STREAM: u32 = 1 << 4;
/// `fuse_open_out.open_flags`: don't flush data cache on close.
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
/// `fuse_open_out.open_flags`: allow concurrent direct writes on the same inode (7.38).
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
/// `fuse_open_out.open_flags`: passthrough read/write I/O for this open file.
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `fuse_open_in.open_flags`: kill suid and sgid if executable.
pub const FUSE_OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// `fuse_release_in.release_flags`: flush data.
pub const FUSE_RELEASE_FLUSH: u32 = 1 << 0;
/// `fuse_release_in.release_flags`: release flock lock.
pub const FUSE_RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const FUSE_GETATTR_FH: u32 = 1 << 0;

/// `fuse_write_in.write_flags`: delayed write from the page cache, file handle is guessed.
pub const FUSE_WRITE_CACHE: u32 = 1 << 0;
/// `fuse_write_in.write_flags`: `lock_owner` is valid.
pub const FUSE_WRITE_LOCKOWNER: u32 = 1 << 1;
/// `fuse_write_in.write_flags`: kill suid and sgid bits.
pub const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// `fuse_read_in.read_flags`: `lock_owner` is valid.
pub const FUSE_READ_LOCKOWNER: u32 = 1 << 1;

/// `fuse_fsync_in.fsync_flags`: sync data only, not metadata.
pub const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;

/// `fuse_fallocate_in.mode`: do not change the file size (libc's value).
pub const FALLOC_FL_KEEP_SIZE: u32 = libc::FALLOC_FL_KEEP_SIZE as u32;
/// `fuse_fallocate_in.mode`: deallocate the range (needs KEEP_SIZE).
pub const FALLOC_FL_PUNCH_HOLE: u32 = libc::FALLOC_FL_PUNCH_HOLE as u32;
/// `fuse_fallocate_in.mode`: remove the range, shifting the tail down.
pub const FALLOC_FL_COLLAPSE_RANGE: u32 = libc::FALLOC_FL_COLLAPSE_RANGE as u32;
/// `fuse_fallocate_in.mode`: zero the range.
pub const FALLOC_FL_ZERO_RANGE: u32 = libc::FALLOC_FL_ZERO_RANGE as u32;
/// `fuse_fallocate_in.mode`: insert a hole, shifting the tail up.
pub const FALLOC_FL_INSERT_RANGE: u32 = libc::FALLOC_FL_INSERT_RANGE as u32;
/// `fuse_fallocate_in.mode`: unshare shared blocks.
pub const FALLOC_FL_UNSHARE_RANGE: u32 = libc::FALLOC_FL_UNSHARE_RANGE as u32;

/// ioctl type ("magic") of the `/dev/fuse` device ioctls.
pub const FUSE_DEV_IOC_MAGIC: u32 = 229;
/// `ioctl(new_fd, FUSE_DEV_IOC_CLONE, &session_fd)`: attach a freshly opened `/dev/fuse`
/// to an existing session, giving it its own request queue. `_IOR(229, 0, uint32_t)`;
/// the number is built by libc so that it is right on every architecture.
pub const FUSE_DEV_IOC_CLONE: libc::Ioctl = libc::_IOR::<u32>(FUSE_DEV_IOC_MAGIC, 0);

// ---------------------------------------------------------------------------------------
// Structs
// ---------------------------------------------------------------------------------------

/// `struct fuse_in_header`: starts every request the kernel sends.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_in_header {
    /// Length of the whole request, this header included.
    pub len: u32,
    /// `FUSE_*` opcode.
    pub opcode: u32,
    /// Request id; the reply carries it back.
    pub unique: u64,
    /// Inode the request is about.
    pub nodeid: u64,
    /// Caller's fsuid.
    pub uid: u32,
    /// Caller's fsgid.
    pub gid: u32,
    /// Caller's tgid.
    pub pid: u32,
    /// Length of request extensions in 8-byte units (7.38; zero before).
    pub total_extlen: u16,
    /// Padding.
    pub padding: u16,
}

/// `struct fuse_out_header`: starts every reply.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_out_header {
    /// Length of the whole reply, this header included.
    pub len: u32,
    /// 0 or a negative errno (greater than -512, or the kernel rejects the reply).
    pub error: i32,
    /// `fuse_in_header.unique` of the request answered.
    pub unique: u64,
}

/// `struct fuse_attr`: file attributes inside `fuse_attr_out` and `fuse_entry_out`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_attr {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Access time, seconds.
    pub atime: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Change time, seconds.
    pub ctime: u64,
    /// Access time, nanoseconds.
    pub atimensec: u32,
    /// Modification time, nanoseconds.
    pub mtimensec: u32,
    /// Change time, nanoseconds.
    pub ctimensec: u32,
    /// File type and permissions.
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a special file.
    pub rdev: u32,
    /// Preferred I/O size (7.9).
    pub blksize: u32,
    /// `FUSE_ATTR_*` flags (7.32; padding before).
    pub flags: u32,
}

/// `struct fuse_kstatfs`: file system statistics inside `fuse_statfs_out`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_kstatfs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Maximum name length.
    pub namelen: u32,
    /// Fragment size (7.4).
    pub frsize: u32,
    /// Padding.
    pub padding: u32,
    /// Reserved.
    pub spare: [u32; 6],
}

/// `struct fuse_entry_out`: reply to LOOKUP (and CREATE, MKNOD, …).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_entry_out {
    /// Inode id; nodeid:generation must be unique for the file system's lifetime.
    pub nodeid: u64,
    /// Inode generation.
    pub generation: u64,
    /// Cache timeout for the name, seconds.
    pub entry_valid: u64,
    /// Cache timeout for the attributes, seconds.
    pub attr_valid: u64,
    /// Cache timeout for the name, nanoseconds.
    pub entry_valid_nsec: u32,
    /// Cache timeout for the attributes, nanoseconds.
    pub attr_valid_nsec: u32,
    /// Attributes.
    pub attr: fuse_attr,
}

/// `struct fuse_forget_in`: argument of FORGET.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_forget_in {
    /// Lookup references to drop.
    pub nlookup: u64,
}

/// `struct fuse_forget_one`: one element of BATCH_FORGET.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_forget_one {
    /// Inode.
    pub nodeid: u64,
    /// Lookup references to drop.
    pub nlookup: u64,
}

/// `struct fuse_batch_forget_in`: head of BATCH_FORGET, followed by `count`
/// `fuse_forget_one`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_batch_forget_in {
    /// Number of `fuse_forget_one` that follow.
    pub count: u32,
    /// Padding.
    pub dummy: u32,
}

/// `struct fuse_getattr_in`: argument of GETATTR (7.9; no argument before).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_getattr_in {
    /// `FUSE_GETATTR_*` flags.
    pub getattr_flags: u32,
    /// Padding.
    pub dummy: u32,
    /// File handle, valid with `FUSE_GETATTR_FH`.
    pub fh: u64,
}

/// `struct fuse_attr_out`: reply to GETATTR and SETATTR.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_attr_out {
    /// Cache timeout for the attributes, seconds.
    pub attr_valid: u64,
    /// Cache timeout for the attributes, nanoseconds.
    pub attr_valid_nsec: u32,
    /// Padding.
    pub dummy: u32,
    /// Attributes.
    pub attr: fuse_attr,
}

/// `struct fuse_setattr_in`: argument of SETATTR; `valid` says which fields count.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_setattr_in {
    /// `FATTR_*` bits.
    pub valid: u32,
    /// Padding.
    pub padding: u32,
    /// File handle (`FATTR_FH`).
    pub fh: u64,
    /// New size (`FATTR_SIZE`).
    pub size: u64,
    /// Lock owner (`FATTR_LOCKOWNER`).
    pub lock_owner: u64,
    /// Access time, seconds.
    pub atime: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Change time, seconds (7.23).
    pub ctime: u64,
    /// Access time, nanoseconds.
    pub atimensec: u32,
    /// Modification time, nanoseconds.
    pub mtimensec: u32,
    /// Change time, nanoseconds (7.23).
    pub ctimensec: u32,
    /// New mode (`FATTR_MODE`).
    pub mode: u32,
    /// Unused.
    pub unused4: u32,
    /// New owner (`FATTR_UID`).
    pub uid: u32,
    /// New group (`FATTR_GID`).
    pub gid: u32,
    /// Unused.
    pub unused5: u32,
}

/// `struct fuse_open_in`: argument of OPEN and OPENDIR.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_open_in {
    /// open(2) flags.
    pub flags: u32,
    /// `FUSE_OPEN_*` flags.
    pub open_flags: u32,
}

/// `struct fuse_open_out`: reply to OPEN and OPENDIR.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_open_out {
    /// File handle, passed back in later requests.
    pub fh: u64,
    /// `FOPEN_*` flags.
    pub open_flags: u32,
    /// Backing file id for passthrough (7.40; padding before).
    pub backing_id: i32,
}

/// `struct fuse_release_in`: argument of RELEASE and RELEASEDIR.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_release_in {
    /// File handle.
    pub fh: u64,
    /// open(2) flags.
    pub flags: u32,
    /// `FUSE_RELEASE_*` flags (7.8).
    pub release_flags: u32,
    /// Lock owner (7.8).
    pub lock_owner: u64,
}

/// `struct fuse_flush_in`: argument of FLUSH.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_flush_in {
    /// File handle.
    pub fh: u64,
    /// Unused.
    pub unused: u32,
    /// Padding.
    pub padding: u32,
    /// Lock owner.
    pub lock_owner: u64,
}

/// `struct fuse_read_in`: argument of READ and READDIR.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_read_in {
    /// File handle.
    pub fh: u64,
    /// Byte offset.
    pub offset: u64,
    /// Bytes to read.
    pub size: u32,
    /// `FUSE_READ_*` flags.
    pub read_flags: u32,
    /// Lock owner (7.9).
    pub lock_owner: u64,
    /// open(2) flags (7.9).
    pub flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_write_in`: argument of WRITE, followed by `size` bytes of data.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_write_in {
    /// File handle.
    pub fh: u64,
    /// Byte offset.
    pub offset: u64,
    /// Bytes of data that follow.
    pub size: u32,
    /// `FUSE_WRITE_*` flags.
    pub write_flags: u32,
    /// Lock owner (7.9).
    pub lock_owner: u64,
    /// open(2) flags (7.9).
    pub flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_write_out`: reply to WRITE.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_write_out {
    /// Bytes written.
    pub size: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_statfs_out`: reply to STATFS.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_statfs_out {
    /// Statistics.
    pub st: fuse_kstatfs,
}

/// `struct fuse_fsync_in`: argument of FSYNC (and FSYNCDIR).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_fsync_in {
    /// File handle.
    pub fh: u64,
    /// `FUSE_FSYNC_*` flags.
    pub fsync_flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_init_in`: argument of INIT. Older kernels send a prefix of it (see
/// [`init_in_size`]); the parser zero-fills the rest.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_init_in {
    /// Kernel's major version.
    pub major: u32,
    /// Kernel's minor version.
    pub minor: u32,
    /// Kernel's readahead limit (7.6).
    pub max_readahead: u32,
    /// INIT flags, bits 0..31 (7.6).
    pub flags: u32,
    /// INIT flags, bits 32..63, valid with `FUSE_INIT_EXT` (7.36).
    pub flags2: u32,
    /// Reserved (7.36).
    pub unused: [u32; 11],
}

/// `struct fuse_init_out`: reply to INIT. Older kernels expect a prefix of it (see
/// [`init_out_size`]).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_init_out {
    /// Our major version.
    pub major: u32,
    /// Negotiated minor version.
    pub minor: u32,
    /// Granted readahead (7.6).
    pub max_readahead: u32,
    /// Granted INIT flags, bits 0..31 (7.5).
    pub flags: u32,
    /// Maximum background requests (7.13).
    pub max_background: u16,
    /// Background requests before the bdi counts as congested (7.13).
    pub congestion_threshold: u16,
    /// Largest WRITE payload (7.5).
    pub max_write: u32,
    /// Timestamp granularity in ns (7.23).
    pub time_gran: u32,
    /// Pages per request, with `FUSE_MAX_PAGES` (7.28).
    pub max_pages: u16,
    /// DAX map alignment, with `FUSE_MAP_ALIGNMENT` (7.31).
    pub map_alignment: u16,
    /// Granted INIT flags, bits 32..63, with `FUSE_INIT_EXT` (7.36).
    pub flags2: u32,
    /// Passthrough stacking depth (7.40).
    pub max_stack_depth: u32,
    /// Request timeout in seconds, with `FUSE_REQUEST_TIMEOUT` (7.43).
    pub request_timeout: u16,
    /// Reserved.
    pub unused: [u16; 11],
}

/// `struct fuse_interrupt_in`: argument of INTERRUPT.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_interrupt_in {
    /// `unique` of the request to interrupt.
    pub unique: u64,
}

/// `struct fuse_fallocate_in`: argument of FALLOCATE.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_fallocate_in {
    /// File handle.
    pub fh: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FALLOC_FL_*` mode.
    pub mode: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_lseek_in`: argument of LSEEK.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_lseek_in {
    /// File handle.
    pub fh: u64,
    /// Starting offset.
    pub offset: u64,
    /// `SEEK_DATA` or `SEEK_HOLE` (others are handled by the kernel).
    pub whence: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_lseek_out`: reply to LSEEK.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_lseek_out {
    /// Resulting offset.
    pub offset: u64,
}

/// `struct fuse_dirent` without its flexible `name[]`: one READDIR entry is this
/// header, `namelen` name bytes, and zero padding up to [`fuse_dirent_size`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_dirent {
    /// Inode number.
    pub ino: u64,
    /// Offset of the *next* entry (cookie for the next READDIR).
    pub off: u64,
    /// Length of the name that follows.
    pub namelen: u32,
    /// File type, as `d_type` (`DT_REG`, …).
    pub r#type: u32,
}

/// `FUSE_NAME_OFFSET`: where the name starts inside a `fuse_dirent`.
pub const FUSE_NAME_OFFSET: usize = size_of::<fuse_dirent>();

/// `FUSE_DIRENT_ALIGN(x)`: round up to the 8-byte alignment of directory entries.
pub const fn fuse_dirent_align(x: usize) -> usize {
    (x + size_of::<u64>() - 1) & !(size_of::<u64>() - 1)
}

/// `FUSE_DIRENT_SIZE(d)`: bytes one directory entry with a `namelen`-byte name occupies.
pub const fn fuse_dirent_size(namelen: usize) -> usize {
    fuse_dirent_align(FUSE_NAME_OFFSET + namelen)
}

// ---------------------------------------------------------------------------------------
// Compat sizes: how big a struct was before it grew
// ---------------------------------------------------------------------------------------

/// `fuse_init_out` size for minor < 5 (major and minor only).
pub const FUSE_COMPAT_INIT_OUT_SIZE: usize = 8;
/// `fuse_init_out` size for minor 5..=22 (up to and including `max_write`).
pub const FUSE_COMPAT_22_INIT_OUT_SIZE: usize = 24;
/// `fuse_entry_out` size for minor < 9 (before `fuse_attr.blksize`).
pub const FUSE_COMPAT_ENTRY_OUT_SIZE: usize = 120;
/// `fuse_attr_out` size for minor < 9 (before `fuse_attr.blksize`).
pub const FUSE_COMPAT_ATTR_OUT_SIZE: usize = 96;
/// `fuse_write_in` size for minor < 9 (before `lock_owner` and `flags`).
pub const FUSE_COMPAT_WRITE_IN_SIZE: usize = 24;
/// `fuse_statfs_out` size for minor < 4 (before `frsize`).
pub const FUSE_COMPAT_STATFS_SIZE: usize = 48;

/// `fuse_init_in` size for minor < 6 (major and minor only). Not in the kernel header.
pub const COMPAT_INIT_IN_SIZE: usize = 8;
/// `fuse_init_in` size for minor 6..=35 (before `flags2`); QEMU's `fuse_init_in_compat`.
/// Not in the kernel header.
pub const COMPAT_35_INIT_IN_SIZE: usize = 16;
/// `fuse_read_in` size for minor < 9 (before `lock_owner` and `flags`). Not in the kernel
/// header, which only names the WRITE one.
pub const COMPAT_READ_IN_SIZE: usize = 24;
/// `fuse_release_in` size for minor < 8 (`release_flags` was padding, no `lock_owner`). Not in
/// the kernel header.
pub const COMPAT_RELEASE_IN_SIZE: usize = 16;

/// The size of one struct as a function of the protocol minor: a list of
/// `(since_minor, size)` steps in ascending order, the first starting at minor 0.
///
/// This is how "protocol-version differences are data": a handler asks
/// `ENTRY_OUT_SIZES.at(minor)` (or [`entry_out_size`]) instead of testing the minor itself.
#[derive(Clone, Copy, Debug)]
pub struct SizeByMinor(&'static [(u32, usize)]);

impl SizeByMinor {
    /// The size in bytes at protocol minor `minor`.
    pub const fn at(&self, minor: u32) -> usize {
        let steps = self.0;
        let mut size = steps[0].1;
        let mut i = 1;
        while i < steps.len() && steps[i].0 <= minor {
            size = steps[i].1;
            i += 1;
        }
        size
    }

    /// The size in the newest protocol this file describes.
    pub const fn current(&self) -> usize {
        self.at(FUSE_KERNEL_MINOR_VERSION)
    }
}

/// `fuse_init_in`: 8 bytes before 7.6, 16 before 7.36, 64 since.
pub const INIT_IN_SIZES: SizeByMinor = SizeByMinor(&[
    (0, COMPAT_INIT_IN_SIZE),
    (6, COMPAT_35_INIT_IN_SIZE),
    (36, size_of::<fuse_init_in>()),
]);
/// `fuse_init_out`: 8 bytes before 7.5, 24 before 7.23, 64 since.
pub const INIT_OUT_SIZES: SizeByMinor = SizeByMinor(&[
    (0, FUSE_COMPAT_INIT_OUT_SIZE),
    (5, FUSE_COMPAT_22_INIT_OUT_SIZE),
    (23, size_of::<fuse_init_out>()),
]);
/// `fuse_entry_out`: 120 bytes before 7.9, 128 since.
pub const ENTRY_OUT_SIZES: SizeByMinor = SizeByMinor(&[
    (0, FUSE_COMPAT_ENTRY_OUT_SIZE),
    (9, size_of::<fuse_entry_out>()),
]);
/// `fuse_attr_out`: 96 bytes before 7.9, 104 since.
pub const ATTR_OUT_SIZES: SizeByMinor = SizeByMinor(&[
    (0, FUSE_COMPAT_ATTR_OUT_SIZE),
    (9, size_of::<fuse_attr_out>()),
]);
/// `fuse_statfs_out`: 48 bytes before 7.4, 80 since.
pub const STATFS_OUT_SIZES: SizeByMinor = SizeByMinor(&[
    (0, FUSE_COMPAT_STATFS_SIZE),
    (4, size_of::<fuse_statfs_out>()),
]);
/// `fuse_read_in`: 24 bytes before 7.9, 40 since.
pub const READ_IN_SIZES: SizeByMinor =
    SizeByMinor(&[(0, COMPAT_READ_IN_SIZE), (9, size_of::<fuse_read_in>())]);
/// `fuse_write_in`: 24 bytes before 7.9, 40 since.
pub const WRITE_IN_SIZES: SizeByMinor = SizeByMinor(&[
    (0, FUSE_COMPAT_WRITE_IN_SIZE),
    (9, size_of::<fuse_write_in>()),
]);
/// `fuse_getattr_in`: absent (0 bytes) before 7.9, 16 since.
pub const GETATTR_IN_SIZES: SizeByMinor = SizeByMinor(&[(0, 0), (9, size_of::<fuse_getattr_in>())]);
/// `fuse_release_in`: 16 bytes before 7.8, 24 since.
pub const RELEASE_IN_SIZES: SizeByMinor = SizeByMinor(&[
    (0, COMPAT_RELEASE_IN_SIZE),
    (8, size_of::<fuse_release_in>()),
]);

/// Bytes of `fuse_init_in` a kernel speaking `minor` sends.
pub const fn init_in_size(minor: u32) -> usize {
    INIT_IN_SIZES.at(minor)
}
/// Bytes of `fuse_init_out` a kernel speaking `minor` accepts.
pub const fn init_out_size(minor: u32) -> usize {
    INIT_OUT_SIZES.at(minor)
}
/// Bytes of `fuse_entry_out` to send at `minor`.
pub const fn entry_out_size(minor: u32) -> usize {
    ENTRY_OUT_SIZES.at(minor)
}
/// Bytes of `fuse_attr_out` to send at `minor`.
pub const fn attr_out_size(minor: u32) -> usize {
    ATTR_OUT_SIZES.at(minor)
}
/// Bytes of `fuse_statfs_out` to send at `minor`.
pub const fn statfs_out_size(minor: u32) -> usize {
    STATFS_OUT_SIZES.at(minor)
}
/// Bytes of `fuse_read_in` the kernel sends at `minor`.
pub const fn read_in_size(minor: u32) -> usize {
    READ_IN_SIZES.at(minor)
}
/// Bytes of `fuse_write_in` the kernel sends at `minor`.
pub const fn write_in_size(minor: u32) -> usize {
    WRITE_IN_SIZES.at(minor)
}
/// Bytes of `fuse_getattr_in` the kernel sends at `minor` (0: GETATTR has no argument).
pub const fn getattr_in_size(minor: u32) -> usize {
    GETATTR_IN_SIZES.at(minor)
}
/// Bytes of `fuse_release_in` the kernel sends at `minor`.
pub const fn release_in_size(minor: u32) -> usize {
    RELEASE_IN_SIZES.at(minor)
}

// ---------------------------------------------------------------------------------------
// FUSE over io_uring (7.42, Linux 6.14): the buffers of a ring entry and the command of an
// SQE. See `crate::uring_transport` and docs/fuse-uring.md.
// ---------------------------------------------------------------------------------------

/// Bytes of `fuse_uring_req_header.in_out`: room for `fuse_in_header` (request) or
/// `fuse_out_header` (reply).
pub const FUSE_URING_IN_OUT_HEADER_SZ: usize = 128;
/// Bytes of `fuse_uring_req_header.op_in`: room for the opcode's fixed argument
/// (`fuse_write_in`, `fuse_read_in`, ...).
pub const FUSE_URING_OP_IN_OUT_SZ: usize = 128;

/// `enum fuse_uring_cmd`: the `cmd_op` of an `IORING_OP_URING_CMD` on `/dev/fuse`.
pub const FUSE_IO_URING_CMD_INVALID: u32 = 0;
/// Register an entry's buffers on a queue and wait for its first request.
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
/// Hand in the reply to the entry's request and wait for its next request.
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// The kernel refuses an entry whose header iovec is shorter than this.
pub const FUSE_URING_REQ_HEADER_SIZE: usize = size_of::<fuse_uring_req_header>();
/// The iovecs of a REGISTER: header buffer and payload buffer (`sqe->len` must be this).
pub const FUSE_URING_IOV_SEGS: u32 = 2;

/// `struct fuse_uring_ent_in_out`: the part of the header buffer that describes the payload.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_uring_ent_in_out {
    /// Unused (0).
    pub flags: u64,
    /// Request: the id to commit the reply with (the request's `unique`).
    pub commit_id: u64,
    /// Bytes of the payload buffer in use: the request's arguments after the fixed one, or
    /// the reply's body after `fuse_out_header`.
    pub payload_sz: u32,
    /// Padding.
    pub padding: u32,
    /// Reserved.
    pub reserved: u64,
}

/// `struct fuse_uring_req_header`: an entry's header buffer (iovec 0 of a REGISTER).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct fuse_uring_req_header {
    /// `fuse_in_header` of the request; the reply's `fuse_out_header` goes here.
    pub in_out: [u8; FUSE_URING_IN_OUT_HEADER_SZ],
    /// The opcode's fixed argument (the kernel's `in_args[0]`), possibly empty.
    pub op_in: [u8; FUSE_URING_OP_IN_OUT_SZ],
    /// Payload size and commit id.
    pub ring_ent_in_out: fuse_uring_ent_in_out,
}

/// `struct fuse_uring_cmd_req`: the start of the 80-byte command area of the SQE (the rest is
/// zero).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct fuse_uring_cmd_req {
    /// Unused (0).
    pub flags: u64,
    /// COMMIT_AND_FETCH: `fuse_uring_ent_in_out.commit_id` of the request answered.
    pub commit_id: u64,
    /// Kernel queue (CPU number) the entry belongs to.
    pub qid: u16,
    /// Padding.
    pub padding: [u8; 6],
}

// ---------------------------------------------------------------------------------------
// Layout pins: values of include/uapi/linux/fuse.h at 7.45 (x86-64 and every other arch:
// all fields are naturally aligned and padded by hand, so the layout is the same everywhere)
// ---------------------------------------------------------------------------------------

const _: () = assert!(size_of::<fuse_in_header>() == 40);
const _: () = assert!(size_of::<fuse_uring_ent_in_out>() == 32);
const _: () = assert!(size_of::<fuse_uring_req_header>() == 288);
const _: () = assert!(size_of::<fuse_uring_cmd_req>() == 24);
const _: () = assert!(offset_of!(fuse_uring_req_header, op_in) == 128);
const _: () = assert!(offset_of!(fuse_uring_req_header, ring_ent_in_out) == 256);
const _: () = assert!(offset_of!(fuse_uring_ent_in_out, payload_sz) == 16);
const _: () = assert!(offset_of!(fuse_uring_cmd_req, qid) == 16);
const _: () = assert!(size_of::<fuse_out_header>() == 16);
const _: () = assert!(size_of::<fuse_attr>() == 88);
const _: () = assert!(size_of::<fuse_kstatfs>() == 80);
const _: () = assert!(size_of::<fuse_entry_out>() == 128);
const _: () = assert!(size_of::<fuse_forget_in>() == 8);
const _: () = assert!(size_of::<fuse_forget_one>() == 16);
const _: () = assert!(size_of::<fuse_batch_forget_in>() == 8);
const _: () = assert!(size_of::<fuse_getattr_in>() == 16);
const _: () = assert!(size_of::<fuse_attr_out>() == 104);
const _: () = assert!(size_of::<fuse_setattr_in>() == 88);
const _: () = assert!(size_of::<fuse_open_in>() == 8);
const _: () = assert!(size_of::<fuse_open_out>() == 16);
const _: () = assert!(size_of::<fuse_release_in>() == 24);
const _: () = assert!(size_of::<fuse_flush_in>() == 24);
const _: () = assert!(size_of::<fuse_read_in>() == 40);
const _: () = assert!(size_of::<fuse_write_in>() == 40);
const _: () = assert!(size_of::<fuse_write_out>() == 8);
const _: () = assert!(size_of::<fuse_statfs_out>() == 80);
const _: () = assert!(size_of::<fuse_fsync_in>() == 16);
const _: () = assert!(size_of::<fuse_init_in>() == 64);
const _: () = assert!(size_of::<fuse_init_out>() == 64);
const _: () = assert!(size_of::<fuse_interrupt_in>() == 8);
const _: () = assert!(size_of::<fuse_fallocate_in>() == 32);
const _: () = assert!(size_of::<fuse_lseek_in>() == 24);
const _: () = assert!(size_of::<fuse_lseek_out>() == 8);
const _: () = assert!(size_of::<fuse_dirent>() == 24);
const _: () = assert!(FUSE_NAME_OFFSET == 24);

// A few field offsets.
const _: () = assert!(offset_of!(fuse_in_header, opcode) == 4);
const _: () = assert!(offset_of!(fuse_in_header, unique) == 8);
const _: () = assert!(offset_of!(fuse_in_header, nodeid) == 16);
const _: () = assert!(offset_of!(fuse_in_header, total_extlen) == 36);
const _: () = assert!(offset_of!(fuse_out_header, unique) == 8);
const _: () = assert!(offset_of!(fuse_init_in, flags2) == 16);
const _: () = assert!(offset_of!(fuse_init_out, max_background) == 16);
const _: () = assert!(offset_of!(fuse_init_out, max_write) == 20);
const _: () = assert!(offset_of!(fuse_init_out, max_pages) == 28);
const _: () = assert!(offset_of!(fuse_init_out, flags2) == 32);
const _: () = assert!(offset_of!(fuse_init_out, request_timeout) == 40);
const _: () = assert!(offset_of!(fuse_setattr_in, mode) == 68);
const _: () = assert!(offset_of!(fuse_write_in, size) == 16);
const _: () = assert!(offset_of!(fuse_fallocate_in, mode) == 24);
const _: () = assert!(offset_of!(fuse_dirent, r#type) == 20);

// Every compat size is where the grown part starts: the old layout is a prefix of the new.
const _: () = assert!(offset_of!(fuse_init_out, max_readahead) == FUSE_COMPAT_INIT_OUT_SIZE);
const _: () = assert!(offset_of!(fuse_init_out, time_gran) == FUSE_COMPAT_22_INIT_OUT_SIZE);
const _: () = assert!(offset_of!(fuse_init_in, max_readahead) == COMPAT_INIT_IN_SIZE);
const _: () = assert!(offset_of!(fuse_init_in, flags2) == COMPAT_35_INIT_IN_SIZE);
const _: () = assert!(
    offset_of!(fuse_entry_out, attr) + offset_of!(fuse_attr, blksize) == FUSE_COMPAT_ENTRY_OUT_SIZE
);
const _: () = assert!(
    offset_of!(fuse_attr_out, attr) + offset_of!(fuse_attr, blksize) == FUSE_COMPAT_ATTR_OUT_SIZE
);
const _: () = assert!(offset_of!(fuse_write_in, lock_owner) == FUSE_COMPAT_WRITE_IN_SIZE);
const _: () = assert!(offset_of!(fuse_read_in, lock_owner) == COMPAT_READ_IN_SIZE);
const _: () = assert!(offset_of!(fuse_release_in, lock_owner) == COMPAT_RELEASE_IN_SIZE);
const _: () = assert!(offset_of!(fuse_kstatfs, frsize) == FUSE_COMPAT_STATFS_SIZE);

// Every size table ends at the current struct size.
const _: () = assert!(INIT_IN_SIZES.current() == size_of::<fuse_init_in>());
const _: () = assert!(INIT_OUT_SIZES.current() == size_of::<fuse_init_out>());
const _: () = assert!(ENTRY_OUT_SIZES.current() == size_of::<fuse_entry_out>());
const _: () = assert!(ATTR_OUT_SIZES.current() == size_of::<fuse_attr_out>());
const _: () = assert!(STATFS_OUT_SIZES.current() == size_of::<fuse_statfs_out>());
const _: () = assert!(READ_IN_SIZES.current() == size_of::<fuse_read_in>());
const _: () = assert!(WRITE_IN_SIZES.current() == size_of::<fuse_write_in>());
const _: () = assert!(GETATTR_IN_SIZES.current() == size_of::<fuse_getattr_in>());
const _: () = assert!(RELEASE_IN_SIZES.current() == size_of::<fuse_release_in>());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_sizes_follow_the_minor() {
        assert_eq!(init_out_size(4), 8);
        assert_eq!(init_out_size(5), 24);
        assert_eq!(init_out_size(9), 24);
        assert_eq!(init_out_size(22), 24);
        assert_eq!(init_out_size(23), 64);
        assert_eq!(init_out_size(45), 64);
        assert_eq!(init_out_size(u32::MAX), 64);
        assert_eq!(init_in_size(5), 8);
        assert_eq!(init_in_size(6), 16);
        assert_eq!(init_in_size(35), 16);
        assert_eq!(init_in_size(36), 64);
    }

    #[test]
    fn sizes_that_grew_at_7_9() {
        assert_eq!(entry_out_size(8), 120);
        assert_eq!(entry_out_size(9), 128);
        assert_eq!(attr_out_size(8), 96);
        assert_eq!(attr_out_size(9), 104);
        assert_eq!(read_in_size(8), 24);
        assert_eq!(read_in_size(9), 40);
        assert_eq!(write_in_size(8), 24);
        assert_eq!(write_in_size(45), 40);
        assert_eq!(getattr_in_size(8), 0);
        assert_eq!(getattr_in_size(9), 16);
        assert_eq!(release_in_size(7), 16);
        assert_eq!(release_in_size(8), 24);
        assert_eq!(statfs_out_size(3), 48);
        assert_eq!(statfs_out_size(4), 80);
    }

    #[test]
    fn dirent_sizes_are_8_byte_aligned() {
        assert_eq!(fuse_dirent_size(0), 24);
        assert_eq!(fuse_dirent_size(1), 32);
        assert_eq!(fuse_dirent_size(8), 32);
        assert_eq!(fuse_dirent_size(9), 40);
    }

    #[test]
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    fn clone_ioctl_number_matches_the_c_macro() {
        // _IOR(229, 0, uint32_t) with the asm-generic encoding.
        assert_eq!(FUSE_DEV_IOC_CLONE as u32, 0x8004_e500);
    }

    #[test]
    fn opcode_names() {
        assert_eq!(opcode_name(FUSE_INIT), Some("INIT"));
        assert_eq!(
            opcode_name(FUSE_COPY_FILE_RANGE_64),
            Some("COPY_FILE_RANGE_64")
        );
        assert_eq!(opcode_name(7), None);
    }

    #[test]
    fn uring_layout_matches_the_kernel_header() {
        // include/uapi/linux/fuse.h (7.42+): 128 + 128 + 32 bytes of header buffer, a 24-byte
        // command that fits the 80-byte SQE area, and FUSE_OVER_IO_URING in flags2 bit 9.
        assert_eq!(FUSE_URING_REQ_HEADER_SIZE, 288);
        assert_eq!(offset_of!(fuse_uring_ent_in_out, commit_id), 8);
        assert_eq!(offset_of!(fuse_uring_ent_in_out, reserved), 24);
        assert_eq!(offset_of!(fuse_uring_cmd_req, commit_id), 8);
        assert!(size_of::<fuse_uring_cmd_req>() <= 80);
        assert_eq!(FUSE_OVER_IO_URING >> 32, 1 << 9);
        assert_eq!(FUSE_IO_URING_CMD_REGISTER, 1);
        assert_eq!(FUSE_IO_URING_CMD_COMMIT_AND_FETCH, 2);
        assert!(size_of::<fuse_in_header>() <= FUSE_URING_IN_OUT_HEADER_SZ);
        assert!(size_of::<fuse_write_in>() <= FUSE_URING_OP_IN_OUT_SZ);
        assert!(size_of::<fuse_init_in>() <= FUSE_URING_OP_IN_OUT_SZ);
    }

    #[test]
    fn falloc_flags_are_the_kernel_values() {
        assert_eq!(FALLOC_FL_KEEP_SIZE, 0x01);
        assert_eq!(FALLOC_FL_PUNCH_HOLE, 0x02);
        assert_eq!(FALLOC_FL_ZERO_RANGE, 0x10);
    }
}
