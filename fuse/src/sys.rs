//! The syscalls of the fuse crate, each wrapped once, typed and safe to call.
//!
//! This module owns every `unsafe` block of the crate: opening and cloning `/dev/fuse`,
//! reading one request (`readv`) and writing one reply (`writev`), `poll`, `mount(2)` and
//! `umount2(2)`, the `statx`/`statfs` queries behind the mountpoint checks, the user and
//! group ids, and receiving a file descriptor over a socket (`SCM_RIGHTS`, for
//! `fusermount3`). Everything above it ([`crate::mount`], the queues, the export) is safe
//! code. It plays the part of the `/dev/fuse` handling in QEMU's `block/export/fuse.c`
//! (`clone_fuse_fd()`, `co_read_from_fuse_fd()`, the reply `writev`) and of the syscalls in
//! libfuse's `lib/mount.c` (`fuse_mount_sys()`, `receive_fd()`, `fuse_kern_unmount()`); the
//! kernel side is `fs/fuse/dev.c`, described in `Documentation/filesystems/fuse.rst`.
//!
//! # Reading a request
//!
//! [`read`] is a plain `read(2)`: where the bytes land (the layout that puts WRITE data on a
//! page boundary) is `crate::transport::buf::RequestBuf`'s business, and what they mean the
//! parser's; this module knows neither.
//!
//! # Errors a session must tell apart
//!
//! [`read_request`] reports `EAGAIN`, `EINTR`, `ENOENT` and `ENODEV` as distinct
//! [`ReadError`] variants because each asks for a different action: go back to polling,
//! read again, read again, shut down. [`write_reply`] swallows `ENOENT` (the request was
//! interrupted and nobody waits for the reply any more) and treats a short write as an
//! error (the kernel takes a reply whole or not at all).
//!
//! The [`IoSlice`]/[`IoSliceMut`] → `iovec` casts rely on std's guarantee that both are
//! ABI-compatible with `struct iovec` on Unix.

use core::mem::MaybeUninit;
use core::ops::BitOr;
use std::ffi::CStr;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use libc::c_int;

use crate::protocol::abi;

/// The FUSE character device.
pub const DEV_FUSE: &str = "/dev/fuse";

/// `statfs.f_type` of a FUSE file system (`FUSE_SUPER_MAGIC` in `include/uapi/linux/magic.h`).
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Wraps `err` with `context`, keeping its kind.
#[cold]
fn with_context(err: io::Error, context: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// The result of a syscall that returns -1 and sets `errno` on failure.
fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

// ---------------------------------------------------------------------------------------
// /dev/fuse
// ---------------------------------------------------------------------------------------

/// Opens `/dev/fuse` read-write, close-on-exec and non-blocking: a new, unattached device
/// file, to be passed to `mount(2)` as `fd=N` or attached to a session with
/// [`clone_dev_fuse`].
///
/// A missing device gives an error (kind `NotFound`) that says what to do about it.
///
/// libfuse: lib/mount.c, fuse_mount_sys()
pub fn open_dev_fuse() -> io::Result<OwnedFd> {
    // std adds O_CLOEXEC itself.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(DEV_FUSE)
        .map(OwnedFd::from)
        .map_err(dev_fuse_error)
}

#[cold]
fn dev_fuse_error(err: io::Error) -> io::Error {
    match err.raw_os_error() {
        // ENOENT: no device node; ENODEV/ENXIO: a node but no driver behind it.
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => io::Error::new(
            io::ErrorKind::NotFound,
            "/dev/fuse is absent: load the fuse module or run in a container with /dev/fuse",
        ),
        Some(libc::EACCES | libc::EPERM) => with_context(
            err,
            "cannot open /dev/fuse (it must be readable and writable by this user, \
             usually mode 0666; fusermount3 opens it with our rights too)",
        ),
        _ => with_context(err, "cannot open /dev/fuse"),
    }
}

/// Opens a new `/dev/fuse` and attaches it to the session of `session_fd`
/// (`ioctl(FUSE_DEV_IOC_CLONE)`): the new fd reads requests of the same mount and must
/// answer each request on the fd that read it. Non-blocking, close-on-exec.
///
/// QEMU: block/export/fuse.c, clone_fuse_fd(); libfuse: lib/fuse_loop_mt.c, fuse_clone_chan()
pub fn clone_dev_fuse(session_fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = open_dev_fuse()?;
    // A BorrowedFd is never negative.
    let session = session_fd.as_raw_fd() as u32;
    // SAFETY: `fd` is an open /dev/fuse; FUSE_DEV_IOC_CLONE reads one u32 through the
    // pointer, which points to a live local for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            abi::FUSE_DEV_IOC_CLONE,
            &session as *const u32,
        )
    };
    check(ret).map_err(|e| with_context(e, "cannot clone the /dev/fuse session"))?;
    Ok(fd)
}

/// Why [`read_request`] returned no request.
#[derive(Debug)]
pub enum ReadError {
    /// `EAGAIN`: nothing pending (another clone took the request); go back to polling.
    WouldBlock,
    /// `EINTR`: a signal arrived; read again.
    Interrupted,
    /// `ENOENT`: the request was interrupted while it was being handed over; read again.
    RequestGone,
    /// `ENODEV` (the file system was unmounted) or `ECONNABORTED` (the connection was
    /// aborted through `/sys/fs/fuse/connections/N/abort` with `FUSE_ABORT_ERROR`): the
    /// session is over; shut down.
    Unmounted,
    /// Anything else, e.g. `EINVAL` when the buffers are smaller than the kernel requires
    /// (see `request::request_buffer_size`).
    Io(io::Error),
}

impl ReadError {
    /// Sorts an errno from `readv` on `/dev/fuse`.
    fn from_os(err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EAGAIN) => ReadError::WouldBlock,
            Some(libc::EINTR) => ReadError::Interrupted,
            Some(libc::ENOENT) => ReadError::RequestGone,
            Some(libc::ENODEV | libc::ECONNABORTED) => ReadError::Unmounted,
            _ => ReadError::Io(err),
        }
    }

    /// Whether reading again right away is the right reaction (`Interrupted`,
    /// `RequestGone`).
    pub fn should_retry(&self) -> bool {
        matches!(self, ReadError::Interrupted | ReadError::RequestGone)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::WouldBlock => f.write_str("no FUSE request pending"),
            ReadError::Interrupted => f.write_str("reading /dev/fuse was interrupted by a signal"),
            ReadError::RequestGone => {
                f.write_str("the FUSE request was interrupted before it could be read")
            }
            ReadError::Unmounted => f.write_str("the FUSE session ended (unmounted or aborted)"),
            ReadError::Io(err) => write!(f, "reading /dev/fuse failed: {err}"),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadError::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<ReadError> for io::Error {
    fn from(err: ReadError) -> io::Error {
        match err {
            ReadError::Io(err) => err,
            ReadError::WouldBlock => io::ErrorKind::WouldBlock.into(),
            ReadError::Interrupted => io::ErrorKind::Interrupted.into(),
            ReadError::RequestGone => io::Error::from_raw_os_error(libc::ENOENT),
            ReadError::Unmounted => io::Error::from_raw_os_error(libc::ENODEV),
        }
    }
}

/// Reads one request from a `/dev/fuse` fd into `buf` with one `read(2)`; returns its length.
/// The kernel copies a request whole or not at all, and refuses (`EINVAL`, [`ReadError::Io`])
/// a buffer shorter than `request::request_buffer_size(max_write)`.
///
/// QEMU: block/export/fuse.c, co_read_from_fuse_fd()
pub fn read_request(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, ReadError> {
    // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes; the kernel
    // writes at most that many bytes into it.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(ReadError::from_os(io::Error::last_os_error()));
    }
    Ok(n as usize)
}

/// Writes one reply with one `writev`.
///
/// `ENOENT` means the request was interrupted and the kernel no longer waits for the reply:
/// that is `Ok(())`. A short write cannot happen with a well-formed reply (the kernel
/// accepts a reply whole or fails it), so it is reported as an error (`WriteZero`).
pub fn write_reply(fd: BorrowedFd<'_>, iov: &[IoSlice<'_>]) -> io::Result<()> {
    let total: usize = iov.iter().map(|s| s.len()).sum();
    let count = c_int::try_from(iov.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many reply slices"))?;
    // SAFETY: IoSlice is ABI-compatible with `struct iovec`; every entry describes a live
    // buffer of its stated length, which the kernel only reads.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr().cast::<libc::iovec>(), count) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            _ => Err(with_context(err, "writing a FUSE reply failed")),
        };
    }
    if n as usize != total {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write of a FUSE reply: {n} of {total} bytes"),
        ));
    }
    Ok(())
}

/// What [`poll_dev`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevReady {
    /// A request is pending (another clone may still take it first).
    Readable,
    /// `POLLERR`: the session is over (unmounted or aborted); a read gives `ENODEV`.
    Disconnected,
    /// The timeout passed.
    TimedOut,
}

/// Waits until `fd` (a `/dev/fuse` fd, or any pollable fd) is readable or disconnected, at
/// most `timeout` (`None`: forever). `EINTR` comes back as an error of kind `Interrupted`.
///
/// For simple loops and tests; the export's queues wait in their AioContext instead.
pub fn poll_dev(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<DevReady> {
    let timeout_ms = match timeout {
        None => -1,
        // Round up, so that a sub-millisecond timeout does not become a busy loop.
        Some(d) => c_int::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(c_int::MAX),
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid, exclusively borrowed pollfd and a count of 1.
    check(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })?;
    if pfd.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        Ok(DevReady::Disconnected)
    } else if pfd.revents & libc::POLLIN != 0 {
        Ok(DevReady::Readable)
    } else {
        Ok(DevReady::TimedOut)
    }
}

/// Whether the session of `fd` is over (`POLLERR`): the file system was unmounted (by us or
/// from outside) or the connection was aborted. Never blocks.
///
/// libfuse: lib/mount.c, fuse_kern_unmount()
pub fn is_disconnected(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(poll_dev(fd, Some(Duration::ZERO))? == DevReady::Disconnected)
}

/// Sets `O_NONBLOCK` on `fd` (the fd `fusermount3` passes us is blocking).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory of ours.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL takes an int argument and touches no memory of ours.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// mount(2), umount2(2), file system queries
// ---------------------------------------------------------------------------------------

/// `mount(2)` flags (`MS_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsFlags(libc::c_ulong);

impl MsFlags {
    /// `MS_RDONLY`.
    pub const RDONLY: MsFlags = MsFlags(libc::MS_RDONLY);
    /// `MS_NOSUID`.
    pub const NOSUID: MsFlags = MsFlags(libc::MS_NOSUID);
    /// `MS_NODEV`.
    pub const NODEV: MsFlags = MsFlags(libc::MS_NODEV);

    /// The raw bits.
    pub fn bits(self) -> libc::c_ulong {
        self.0
    }
}

impl BitOr for MsFlags {
    type Output = MsFlags;

    fn bitor(self, rhs: MsFlags) -> MsFlags {
        MsFlags(self.0 | rhs.0)
    }
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: MsFlags,
    data: &CStr,
) -> io::Result<()> {
    // SAFETY: all four pointers are NUL-terminated strings that outlive the call; the kernel
    // copies them and keeps no reference.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags.0,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// `umount2(target, MNT_DETACH)`: detach the mount now, tear it down once unused.
pub fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// What [`stat_nosync`] learns about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathStat {
    /// `st_mode` (file type and permissions); 0 when the file system declined to say (a
    /// FUSE mount of another user without `allow_other`).
    pub mode: u32,
    /// Whether the path is the root of a mount; `None` if the kernel cannot tell (< 5.8).
    pub mount_root: Option<bool>,
}

/// `statx(path, AT_STATX_DONT_SYNC, mask 0)`: file type and "is a mount root", from cached
/// attributes. Unlike `stat`, this never sends a request to the FUSE server of an existing
/// mount on `path` (which may be hung), and works on other users' FUSE mounts.
pub fn stat_nosync(path: &CStr) -> io::Result<PathStat> {
    let mut st = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a writable buffer of
    // the size statx writes.
    check(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            0,
            st.as_mut_ptr(),
        )
    })?;
    // SAFETY: zeroed() initialised every byte, and statx succeeded; all-zero is a valid
    // `statx` (plain integers).
    let st = unsafe { st.assume_init() };
    let root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(PathStat {
        mode: u32::from(st.stx_mode),
        mount_root: (st.stx_attributes_mask & root != 0).then_some(st.stx_attributes & root != 0),
    })
}

/// `statfs(path).f_type`: the file system's magic number ([`FUSE_SUPER_MAGIC`] for FUSE).
/// On a FUSE mount this sends STATFS to its server (unless the caller may not access it).
pub fn statfs_type(path: &CStr) -> io::Result<i64> {
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a writable buffer of
    // the size statfs writes.
    check(unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: zeroed() initialised every byte, and statfs succeeded; all-zero is a valid
    // `statfs` (plain integers).
    let st = unsafe { st.assume_init() };
    // `__fsword_t` is i64 on 64-bit Linux but i32 on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let f_type = i64::from(st.f_type);
    Ok(f_type)
}

/// The real user id (`getuid`).
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory of ours.
    unsafe { libc::getuid() }
}

/// The real group id (`getgid`).
pub fn getgid() -> u32 {
    // SAFETY: getgid cannot fail and touches no memory of ours.
    unsafe { libc::getgid() }
}

/// The effective user id (`geteuid`): 0 means we may `mount(2)` ourselves.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

// ---------------------------------------------------------------------------------------
// fusermount3: passing fds
// ---------------------------------------------------------------------------------------

/// Makes the child of `cmd` inherit `fd` under the same number (clears `FD_CLOEXEC` in the
/// child only, after fork and before exec; the parent's fd stays close-on-exec). `fd` must
/// still be open when `cmd` is spawned.
pub fn inherit_fd(cmd: &mut Command, fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    let clear_cloexec = move || {
        // SAFETY: fcntl is async-signal-safe; F_GETFD/F_SETFD take an int argument and
        // touch no memory.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec, where only async-signal-safe work is
    // allowed: it calls fcntl and builds an `io::Error` from errno, which does not allocate.
    unsafe {
        cmd.pre_exec(clear_cloexec);
    }
}

/// Receives one file descriptor sent with `SCM_RIGHTS` over the stream socket `sock`,
/// blocking. `Ok(None)`: the peer closed the socket without sending one (`fusermount3`
/// failed and said why on stderr). The fd arrives close-on-exec; extra fds in the same
/// message are closed.
///
/// libfuse: lib/mount.c, receive_fd()
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    // Room for several fds, aligned for cmsghdr (u64 alignment suffices on Linux).
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast::<libc::iovec>();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = core::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points to one live iovec and a live, aligned control buffer of the
        // stated sizes, all exclusively borrowed for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut received = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // msg_controllen and return null at its end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg pointers from CMSG_FIRSTHDR/NXTHDR point to a complete
        // header inside `control`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: computing the data offset of a valid header.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: CMSG_LEN only computes a length.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / 4;
            for i in 0..count {
                // SAFETY: the kernel wrote `count` ints after the header, inside `control`;
                // they may be unaligned, hence read_unaligned.
                let raw = unsafe { data.cast::<c_int>().add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` as a new fd of this process, owned by
                // nobody else yet.
                received.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a valid header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message truncated while receiving a file descriptor",
        ));
    }
    if n == 0 && received.is_empty() {
        return Ok(None);
    }
    // Keep the first, close any others.
    let mut received = received.into_iter();
    match received.next() {
        Some(fd) => Ok(Some(fd)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message without a file descriptor",
        )),
    }
}

/// A signalfd for SIGINT/SIGTERM: the signals are blocked for the calling thread (and every
/// thread it creates later, which inherits the mask) and delivered as readable events instead,
/// so the event loop handles them like any fd. QEMU: `qemu_signalfd()` in `util/compatfd.c`.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` in this thread and opens a non-blocking signalfd for them. Call it
    /// before creating threads.
    pub fn new(signals: &[c_int]) -> io::Result<SignalFd> {
        // SAFETY: `set` is a local sigset_t initialised by sigemptyset before any other use;
        // the pointers passed are valid for the duration of each call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalFd {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The next pending signal's number, if any.
    pub fn read(&self) -> Option<c_int> {
        // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is exactly that big.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Memory for large request and reply buffers: an anonymous mapping at a 2 MiB boundary, marked
/// for transparent huge pages, so that the kernel's copy of WRITE data into it (in `read`) or
/// of READ data out of it pins one huge page instead of 256 small ones and stays within a few
/// TLB entries. `crate::transport::buf` builds the crate's buffers and their pool on it.
pub struct HugePages {
    ptr: std::ptr::NonNull<u8>,
    map_len: usize,
    len: usize,
}

// SAFETY: the buffer is plain memory exclusively owned by this value.
unsafe impl Send for HugePages {}

impl HugePages {
    /// The size of a huge page, and so the granularity of a mapping.
    pub const HUGE: usize = 2 << 20;

    /// Bytes mapped: the most [`HugePages::set_len`] allows.
    pub fn capacity(&self) -> usize {
        self.map_len
    }

    /// Shows `len` bytes (at most [`HugePages::capacity`]; more is clamped) of the mapping,
    /// for reusing one mapping for buffers of several sizes.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.map_len);
    }

    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> io::Result<HugePages> {
        let map_len = len.div_ceil(Self::HUGE).max(1) * Self::HUGE;
        // Over-allocate by one huge page so that an aligned start exists inside the mapping.
        let total = map_len + Self::HUGE;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = (start + Self::HUGE - 1) & !(Self::HUGE - 1);
        // SAFETY: both ranges lie inside the mapping just created and are unmapped exactly once:
        // the slack before the aligned start and after its end.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let end = aligned + map_len;
            let tail = start + total - end;
            if tail > 0 {
                libc::munmap(end as *mut libc::c_void, tail);
            }
            // Advice only: without THP the buffer still works with small pages.
            libc::madvise(aligned as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE);
        }
        match std::ptr::NonNull::new(aligned as *mut u8) {
            Some(ptr) => Ok(HugePages { ptr, map_len, len }),
            None => Err(io::Error::from_raw_os_error(libc::ENOMEM)),
        }
    }
}

impl std::ops::Deref for HugePages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` starts a live mapping of `map_len >= len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HugePages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` kept; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn read_errors_are_sorted() {
        let mut buf = [0u8; 64];
        let (_tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        assert!(matches!(
            read_request(rx.as_fd(), &mut buf),
            Err(ReadError::WouldBlock)
        ));
        let sorted = |errno| ReadError::from_os(io::Error::from_raw_os_error(errno));
        assert!(matches!(sorted(libc::EINTR), ReadError::Interrupted));
        assert!(matches!(sorted(libc::ENOENT), ReadError::RequestGone));
        assert!(matches!(sorted(libc::ENODEV), ReadError::Unmounted));
        assert!(matches!(sorted(libc::ECONNABORTED), ReadError::Unmounted));
        assert!(matches!(sorted(libc::EINVAL), ReadError::Io(_)));
        assert!(sorted(libc::ENOENT).should_retry());
        assert!(!sorted(libc::EAGAIN).should_retry());
        for err in [
            sorted(libc::EAGAIN),
            sorted(libc::ENODEV),
            sorted(libc::EIO),
        ] {
            let text = err.to_string();
            assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
        }
        assert_eq!(
            io::Error::from(sorted(libc::ENODEV)).raw_os_error(),
            Some(libc::ENODEV)
        );
    }

    #[test]
    fn poll_sees_readable_timeout_and_hangup() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let zero = Some(Duration::ZERO);
        assert_eq!(poll_dev(rx.as_fd(), zero).unwrap(), DevReady::TimedOut);
        tx.write_all(b"x").unwrap();
        assert_eq!(poll_dev(rx.as_fd(), zero).unwrap(), DevReady::Readable);
        drop(tx);
        assert_eq!(poll_dev(rx.as_fd(), zero).unwrap(), DevReady::Disconnected);
    }

    #[test]
    fn write_reply_writes_everything_once() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let reply = crate::protocol::reply::Reply::ok(5, &[b"abc", b"defg"]);
        write_reply(tx.as_fd(), &reply.io_slices()).unwrap();
        let mut got = [0u8; 64];
        let n = io::Read::read(&mut &rx, &mut got).unwrap();
        assert_eq!(n, 16 + 7);
        assert_eq!(&got[16..n], b"abcdefg");
    }

    /// The sending side of `recv_fd`, as `fusermount3`'s send_fd() does it.
    fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) {
        let byte = [0u8; 1];
        let iov = [IoSlice::new(&byte)];
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut().cast::<libc::iovec>();
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a length.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
        // SAFETY: the control buffer holds CMSG_SPACE(4) bytes, enough for one header and
        // one int, and is aligned for cmsghdr; CMSG_FIRSTHDR points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            libc::CMSG_DATA(cmsg)
                .cast::<c_int>()
                .write_unaligned(fd.as_raw_fd());
        }
        // SAFETY: `msg` describes live buffers of the stated sizes, only read by sendmsg.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        assert_eq!(n, 1, "sendmsg: {}", io::Error::last_os_error());
    }

    #[test]
    fn fds_pass_over_a_socket() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_fd(tx.as_fd(), a.as_fd());
        let got = recv_fd(rx.as_fd()).unwrap().expect("an fd");
        assert_ne!(got.as_raw_fd(), a.as_raw_fd());
        // SAFETY: F_GETFD takes no argument and touches no memory.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
        let mut got = UnixStream::from(got);
        got.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        io::Read::read_exact(&mut &b, &mut two).unwrap();
        assert_eq!(&two, b"hi");

        drop(tx);
        assert!(recv_fd(rx.as_fd()).unwrap().is_none(), "EOF means no fd");
    }
}
