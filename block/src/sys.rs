//! The block layer's syscalls, and nothing else: every `unsafe` of the crate lives here.
//!
//! QEMU: the raw calls scattered through `block/file-posix.c` (`qemu_open`, `preadv`,
//! `pwritev`, `qemu_fdatasync`, `do_fallocate`, `ftruncate`, `lseek(SEEK_DATA/SEEK_HOLE)`,
//! `ioctl(BLKSSZGET)`) and `util/osdep.c` (`qemu_lock_fd`, `qemu_lock_fd_test`), plus
//! `qemu_try_memalign` for O_DIRECT bounce buffers.
//!
//! Each wrapper takes a [`BorrowedFd`] (the caller keeps ownership), typed arguments instead of
//! bare flag integers, `u64` offsets (checked when converted to `off_t`), and returns
//! `io::Result`. None of them retries `EINTR`: the callers decide (a read loop retries, a
//! probe does not care). [`AlignedBuf`] is the safe owner of an aligned heap allocation, in
//! the manner of corosensei's `DefaultStack`.

use std::alloc::{self, Layout};
use std::ffi::CString;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A `-1`-on-error return value turned into `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// How [`open`] opens an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// `O_RDWR` instead of `O_RDONLY`.
    pub write: bool,
    /// `O_DIRECT`: bypass the page cache; offsets, lengths and buffers must be aligned.
    pub direct: bool,
}

/// Opens `path` (always `O_CLOEXEC`). QEMU: `qemu_open()`.
pub fn open(path: &Path, flags: OpenFlags) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut oflags = libc::O_CLOEXEC
        | if flags.write {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
    if flags.direct {
        oflags |= libc::O_DIRECT;
    }
    loop {
        // SAFETY: `cpath` is a valid NUL-terminated string that outlives the call; `open` does
        // not keep the pointer.
        let fd = unsafe { libc::open(cpath.as_ptr(), oflags) };
        if fd >= 0 {
            // SAFETY: `open` just returned this descriptor; nobody else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Flags for [`preadv2`] and [`pwritev2`] (plain reads and writes use [`pread`] and
/// [`pwrite`]). QEMU does not use them; its io_uring backend gets a similar effect from the
/// kernel trying `IOCB_NOWAIT` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RwFlags(libc::c_int);

impl RwFlags {
    /// `RWF_NOWAIT`: fail with `EAGAIN` instead of blocking (on a page-cache miss, or for a write
    /// that would have to allocate or wait for writeback). Filesystems without support answer
    /// `EOPNOTSUPP`.
    pub const NOWAIT: RwFlags = RwFlags(libc::RWF_NOWAIT);
}

/// Reads into `buf` at `offset`; returns the bytes read (short at EOF, or with `NOWAIT` when
/// only part is cached). QEMU: `qemu_preadv()`.
pub fn preadv2(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
    flags: RwFlags,
) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let off = off_t(offset)?;
    // SAFETY: the iovec describes `buf`, which is exclusively borrowed for the whole call, so the
    // kernel may write `buf.len()` bytes there; `fd` is a live descriptor borrowed for the call.
    cvt_size(unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, off, flags.0) })
}

/// Writes `buf` at `offset`; returns the bytes written. QEMU: `qemu_pwritev()`.
pub fn pwritev2(fd: BorrowedFd<'_>, buf: &[u8], offset: u64, flags: RwFlags) -> io::Result<usize> {
    // The kernel only reads through `iov_base` for a write; the `*mut` is the C signature's.
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    let off = off_t(offset)?;
    // SAFETY: the iovec describes `buf`, borrowed for the whole call; a write only reads from
    // it. `fd` is a live descriptor borrowed for the call.
    cvt_size(unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, off, flags.0) })
}

/// `pread(2)`. QEMU: `handle_aiocb_rw_linear()`.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = off_t(offset)?;
    // SAFETY: `buf` is exclusively borrowed for the call and its length bounds the write.
    cvt_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) })
}

/// `pwrite(2)`.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let off = off_t(offset)?;
    // SAFETY: `buf` is borrowed for the call and its length bounds what the kernel reads.
    cvt_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) })
}

/// `fdatasync(2)`. QEMU: `qemu_fdatasync()`.
pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a live descriptor; no memory is passed.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

/// What [`fallocate`] does to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate; the range reads as zeros.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: the range reads as zeros and stays allocated.
    ZeroRange,
}

impl FallocMode {
    /// The `mode` argument of `fallocate(2)`.
    pub fn bits(self) -> i32 {
        match self {
            FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
        }
    }
}

/// `fallocate(2)`. QEMU: `do_fallocate()`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: FallocMode, offset: u64, len: u64) -> io::Result<()> {
    let mode = mode.bits();
    let (off, len) = (off_t(offset)?, off_t(len)?);
    // SAFETY: plain syscall on a live descriptor; no memory is passed.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }).map(drop)
}

/// `ftruncate(2)`.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = off_t(len)?;
    // SAFETY: plain syscall on a live descriptor; no memory is passed.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// The `whence` of [`lseek`] that the block layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whence {
    /// `SEEK_DATA`: the first data byte at or after the offset (`ENXIO`: none before EOF).
    Data,
    /// `SEEK_HOLE`: the first hole byte at or after the offset (EOF counts as a hole).
    Hole,
    /// `SEEK_END`: the size (of a block device, too).
    End,
}

/// `lseek(2)`; returns the new offset. Moves the shared file position, which nothing in the
/// block layer uses (all I/O is positioned). QEMU: `find_allocation()`.
pub fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: Whence) -> io::Result<u64> {
    let whence = match whence {
        Whence::Data => libc::SEEK_DATA,
        Whence::Hole => libc::SEEK_HOLE,
        Whence::End => libc::SEEK_END,
    };
    let off = off_t(offset)?;
    // SAFETY: plain syscall on a live descriptor; no memory is passed.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    u64::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// What kind of file a descriptor refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
    Directory,
    Other,
}

/// The fields of `struct stat` the block layer needs.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub kind: FileKind,
    /// `st_size` (0 for block devices: use [`lseek`] with [`Whence::End`]).
    pub size: u64,
    /// Bytes actually allocated (`st_blocks * 512`).
    pub allocated: u64,
}

/// `fstat(2)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable `struct stat`-sized buffer for the kernel to fill.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: `fstat` succeeded, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFBLK => FileKind::BlockDevice,
        libc::S_IFDIR => FileKind::Directory,
        _ => FileKind::Other,
    };
    Ok(Stat {
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        allocated: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
    })
}

/// Whether the file lives on a memory-backed filesystem (tmpfs, ramfs, hugetlbfs): there, a
/// read or write only copies memory and never waits for a disk.
pub fn is_memory_backed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6_u32 as i64;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6_u32 as i64;
    let mut sfs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `sfs` is a writable `struct statfs` for the kernel to fill.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), sfs.as_mut_ptr()) })?;
    // `f_type` is i64 on x86-64 but narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    // SAFETY: `fstatfs` succeeded, so it initialised the whole struct.
    let f_type = unsafe { sfs.assume_init() }.f_type as i64;
    Ok(matches!(
        f_type,
        TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC
    ))
}

/// O_DIRECT alignment requirements from `statx(STATX_DIOALIGN)` (Linux 6.1+): `(memory,
/// offset)` in bytes, or `None` when the kernel or filesystem does not say.
pub fn dio_alignment(fd: BorrowedFd<'_>) -> io::Result<Option<(u32, u32)>> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid empty C string (with AT_EMPTY_PATH the call refers to `fd`
    // itself) and `stx` is a writable `struct statx` for the kernel to fill.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: the buffer was zeroed (a valid `statx`: integers only) and then filled by the
    // kernel.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

/// The logical block size of a block device (`ioctl(BLKSSZGET)`). QEMU:
/// `probe_logical_blocksize()`.
pub fn logical_block_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `size`.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The type of an open-file-description lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockType {
    /// `F_RDLCK`: many may hold it; conflicts only with a write lock.
    Read,
    /// `F_WRLCK`: conflicts with every other lock.
    Write,
    /// `F_UNLCK`.
    Unlock,
}

fn flock(ty: LockType, start: u64, len: u64) -> io::Result<libc::flock> {
    // SAFETY: `struct flock` is plain old data (integers); all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match ty {
        LockType::Read => libc::F_RDLCK,
        LockType::Write => libc::F_WRLCK,
        LockType::Unlock => libc::F_UNLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = off_t(start)?;
    fl.l_len = off_t(len)?;
    // OFD locks require l_pid == 0 on input (already zero).
    Ok(fl)
}

/// Takes (or with [`LockType::Unlock`] drops) an open-file-description lock on
/// `[start, start+len)`, without waiting: a conflict is `EAGAIN`/`EACCES`. OFD locks belong to
/// the open file, not the process, so two opens in one process conflict like two processes,
/// and closing another descriptor of the same file does not drop them (POSIX locks would).
///
/// QEMU: `qemu_lock_fd()` / `qemu_unlock_fd()` in `util/osdep.c`.
pub fn ofd_setlk(fd: BorrowedFd<'_>, ty: LockType, start: u64, len: u64) -> io::Result<()> {
    let fl = flock(ty, start, len)?;
    // SAFETY: F_OFD_SETLK reads one `struct flock` through the pointer, which points at `fl`.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) })
        .map(drop)
}

/// Whether a lock of type `ty` on `[start, start+len)` would conflict with a lock held through
/// *another* open file description. QEMU: `qemu_lock_fd_test()`.
pub fn ofd_getlk(fd: BorrowedFd<'_>, ty: LockType, start: u64, len: u64) -> io::Result<bool> {
    let mut fl = flock(ty, start, len)?;
    // SAFETY: F_OFD_GETLK reads and rewrites one `struct flock` through the pointer, which
    // points at `fl`, exclusively borrowed for the call.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    })?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// A zero-initialised heap buffer whose address is a multiple of `align`, as O_DIRECT needs.
/// Frees itself on drop. QEMU: `qemu_try_blockalign()` / `qemu_vfree()`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation, like `Vec<u8>`; it has no thread affinity.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, like `Vec<u8>`.
unsafe impl Sync for AlignedBuf {}

// SAFETY: the bytes live in the heap allocation `ptr`, owned by the value until it is dropped
// and never moved or reallocated; moving an `AlignedBuf` moves only the pointer.
unsafe impl runtime::executor::uring::StableBuf for AlignedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two, else `EINVAL`); `ENOMEM` when the
    /// allocator has none (an error for one request, not an abort).
    pub fn zeroed(len: usize, align: usize) -> io::Result<AlignedBuf> {
        // A zero-sized allocation is not allowed; keep at least one alignment unit.
        let layout = Layout::from_size_align(len.max(align).max(1), align.max(1))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size (ensured above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => Ok(AlignedBuf { ptr, len, layout }),
            // No memory is the caller's ENOMEM (a request's error), never an abort.
            None => Err(io::Error::from_raw_os_error(libc::ENOMEM)),
        }
    }

    /// The alignment the buffer was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at an allocation of at least `len` bytes, zero-initialised at
        // creation and owned by `self`, which the returned borrow keeps alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for align in [1usize, 512, 4096] {
            let mut b = AlignedBuf::zeroed(1000, align).expect("alloc");
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert_eq!(b.len(), 1000);
            assert!(b.iter().all(|&x| x == 0));
            b[999] = 7;
            assert_eq!(b[999], 7);
        }
        assert_eq!(AlignedBuf::zeroed(0, 4096).expect("empty").len(), 0);
        assert!(
            AlignedBuf::zeroed(10, 3).is_err(),
            "alignment must be a power of two"
        );
    }
}
