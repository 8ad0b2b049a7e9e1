//! Encoding replies for `/dev/fuse`, and the INIT negotiation.
//!
//! This module owns what goes back to the kernel: a [`Reply`] is a `fuse_out_header` with
//! the right total `len` plus the payload slices, handed to one `writev` as
//! [`std::io::IoSlice`]s (ABI-compatible with `libc::iovec` on Unix, so the `sys` layer
//! may pass them on as such). [`negotiate_init`] is the pure function behind the INIT
//! reply. It mirrors the reply side of the kernel's `include/uapi/linux/fuse.h` (the
//! "Version negotiation" comment, `fuse_out_header`, `fuse_init_out`), QEMU's INIT
//! handling in `block/export/fuse.c` and libfuse's `do_init()` in `lib/fuse_lowlevel.c`.
//!
//! The kernel rejects a reply (and fails the request with EINVAL) whose `error` is
//! positive or ≤ -512, or whose `error` is non-zero while a payload follows; [`Reply::new`]
//! enforces both with a panic, because only a bug in our handlers can produce them.

use core::mem::size_of;
use core::ops::Deref;
use std::io::IoSlice;

use zerocopy::IntoBytes;

use crate::protocol::abi::*;

/// Most payload slices one reply carries (READ data may come as up to three pieces: e.g.
/// data, zero fill, more data). The header makes one more `IoSlice`.
pub const MAX_PAYLOAD_SLICES: usize = 3;

/// Negative errnos must be greater than this, or the kernel rejects the reply.
const ERRNO_LIMIT: i32 = -512;

/// One reply: header plus borrowed payload, ready for a single `writev`.
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    header: fuse_out_header,
    payload: [&'a [u8]; MAX_PAYLOAD_SLICES],
    slices: usize,
}

impl<'a> Reply<'a> {
    /// A reply to request `unique` with `error` (0 or a negative errno) and `payload`
    /// (whose pieces are concatenated on the wire).
    ///
    /// # Panics
    ///
    /// If `error` is positive or ≤ -512, if an error reply has a payload, if there are more
    /// than [`MAX_PAYLOAD_SLICES`] pieces, or if the total exceeds `u32::MAX` bytes: all are
    /// bugs in the caller, which the kernel would answer with EINVAL.
    pub fn new(unique: u64, error: i32, payload: &[&'a [u8]]) -> Self {
        assert!(
            error <= 0 && error > ERRNO_LIMIT,
            "reply error {error} is not 0 or a negative errno"
        );
        assert!(
            payload.len() <= MAX_PAYLOAD_SLICES,
            "too many reply slices: {}",
            payload.len()
        );
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        assert!(
            error == 0 || payload_len == 0,
            "an error reply carries no payload"
        );
        let len = u32::try_from(size_of::<fuse_out_header>() + payload_len)
            .expect("reply longer than u32::MAX bytes");
        let mut slices = [&[][..]; MAX_PAYLOAD_SLICES];
        slices[..payload.len()].copy_from_slice(payload);
        Reply {
            header: fuse_out_header { len, error, unique },
            payload: slices,
            slices: payload.len(),
        }
    }

    /// A successful reply carrying `payload`.
    pub fn ok(unique: u64, payload: &[&'a [u8]]) -> Self {
        Self::new(unique, 0, payload)
    }

    /// An error reply; `errno` is positive, as in `libc::EIO`, and is negated here, once.
    pub fn err(unique: u64, errno: i32) -> Self {
        Self::new(unique, -errno, &[])
    }

    /// The header, whose `len` counts header and payload.
    pub fn header(&self) -> &fuse_out_header {
        &self.header
    }

    /// Bytes the reply occupies on the wire (`header().len`).
    pub fn wire_len(&self) -> usize {
        self.header.len as usize
    }

    /// The reply as `IoSlice`s for one `writev`: the header, then the non-empty payload
    /// pieces.
    pub fn io_slices(&self) -> IoSlices<'_> {
        let mut slices = [IoSlice::new(&[]); 1 + MAX_PAYLOAD_SLICES];
        slices[0] = IoSlice::new(self.header.as_bytes());
        let mut len = 1;
        for piece in self.payload[..self.slices].iter().filter(|p| !p.is_empty()) {
            slices[len] = IoSlice::new(piece);
            len += 1;
        }
        IoSlices { slices, len }
    }
}

/// The `IoSlice`s of one [`Reply`], usable as `&[IoSlice]` (no allocation).
#[derive(Clone, Copy, Debug)]
pub struct IoSlices<'a> {
    slices: [IoSlice<'a>; 1 + MAX_PAYLOAD_SLICES],
    len: usize,
}

impl<'a> Deref for IoSlices<'a> {
    type Target = [IoSlice<'a>];

    fn deref(&self) -> &[IoSlice<'a>] {
        &self.slices[..self.len]
    }
}

/// The first `entry_out_size(minor)` bytes of `out`: what a kernel at `minor` expects.
pub fn entry_out_bytes(out: &fuse_entry_out, minor: u32) -> &[u8] {
    &out.as_bytes()[..entry_out_size(minor)]
}

/// The first `attr_out_size(minor)` bytes of `out`.
pub fn attr_out_bytes(out: &fuse_attr_out, minor: u32) -> &[u8] {
    &out.as_bytes()[..attr_out_size(minor)]
}

/// The first `statfs_out_size(minor)` bytes of `out`.
pub fn statfs_out_bytes(out: &fuse_statfs_out, minor: u32) -> &[u8] {
    &out.as_bytes()[..statfs_out_size(minor)]
}

// ---------------------------------------------------------------------------------------
// INIT
// ---------------------------------------------------------------------------------------

/// Oldest protocol minor we serve: 7.9 brought `fuse_getattr_in`, `lock_owner` in READ and
/// WRITE and `blksize` in `fuse_attr`; older kernels are refused with EINVAL.
pub const MIN_SUPPORTED_MINOR: u32 = 9;

/// INIT flags we offer by default: asynchronous (parallel) reads, writes larger than a page,
/// asynchronous direct I/O, a configurable request size, and the `flags2` extension.
pub const OFFERED_INIT_FLAGS: u64 =
    FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES | FUSE_INIT_EXT;

/// Default largest WRITE (and, through `max_pages`, READ): 1 MiB.
pub const DEFAULT_MAX_WRITE: u32 = 1 << 20;

/// The kernel never uses a `max_write` below this.
const MIN_MAX_WRITE: u32 = 4096;

/// What we offer in INIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitConfig {
    /// INIT flags we support (64-bit: bits 32.. go through `flags2`).
    pub flags: u64,
    /// Largest WRITE we accept; clamped to at least 4096. The read buffer must hold
    /// `request::request_buffer_size(max_write)` bytes.
    pub max_write: u32,
    /// Readahead we allow at most; the reply carries the smaller of this and the kernel's.
    pub max_readahead: u32,
    /// How many background (asynchronous) requests the kernel may have outstanding. The
    /// kernel's own default is 12; with `FUSE_ASYNC_DIO` the requests of one O_DIRECT
    /// submitter are background requests, so this is the queue depth we can see. Default:
    /// `u16::MAX`, as QEMU (libfuse's maximum); the kernel caps it at
    /// `fs.fuse.max_user_bgreq` for unprivileged mounts. 0 keeps the kernel's default.
    pub max_background: u16,
    /// Background requests after which the kernel reports the bdi congested. Default: 3/4
    /// of `max_background`, as QEMU and the kernel's own default ratio. 0 keeps the
    /// kernel's default.
    pub congestion_threshold: u16,
    /// Page size used to turn `max_write` into `max_pages`; must be a power of two.
    pub page_size: u32,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            flags: OFFERED_INIT_FLAGS,
            max_write: DEFAULT_MAX_WRITE,
            max_readahead: DEFAULT_MAX_WRITE,
            max_background: u16::MAX,
            congestion_threshold: (u32::from(u16::MAX) * 3 / 4) as u16,
            page_size: 4096,
        }
    }
}

/// The session parameters both sides agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol minor of the session: `min(FUSE_KERNEL_MINOR_VERSION, kernel's)`. Pass it
    /// to `request::parse` and the `*_out_size` functions.
    pub minor: u32,
    /// Granted INIT flags: requested ∩ offered (64-bit).
    pub flags: u64,
    /// Largest WRITE payload the kernel will send.
    pub max_write: u32,
    /// Granted readahead.
    pub max_readahead: u32,
    /// Pages per request the kernel will use (32, its default, without `FUSE_MAX_PAGES`).
    pub max_pages: u16,
}

/// The outcome of INIT: the reply payload and, unless the kernel must retry, the
/// negotiated parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitReply {
    out: fuse_init_out,
    len: usize,
    negotiated: Option<Negotiated>,
}

impl InitReply {
    /// The reply payload: `fuse_init_out` truncated to the size the kernel's minor expects.
    pub fn as_bytes(&self) -> &[u8] {
        &self.out.as_bytes()[..self.len]
    }

    /// The full struct (fields past `as_bytes().len()` are not sent).
    pub fn out(&self) -> &fuse_init_out {
        &self.out
    }

    /// The session parameters, or `None` when the kernel spoke a newer major version and
    /// was told ours: it will send another INIT.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }
}

/// Answers the kernel's INIT.
///
/// - Major > 7: as `fuse.h` prescribes ("userspace shall reply with the major version it
///   supports, ignore the rest of the INIT message and expect a new INIT message"), the
///   reply is only major 7 and our minor (`FUSE_COMPAT_INIT_OUT_SIZE` bytes), and there is
///   no session yet. libfuse does the same ("Wait for a second INIT request with a 7.X
///   version"). Linux has never sent a major other than 7. (QEMU instead refuses any
///   major other than 7 with EINVAL.)
/// - Major < 7 or minor < [`MIN_SUPPORTED_MINOR`]: `Err(EINVAL)`, to be sent as the error
///   reply (the kernel then fails the mount's connection).
/// - Otherwise minor = min(45, kernel's); flags = requested ∩ offered, where the kernel's
///   `flags2` counts only when it sets `FUSE_INIT_EXT`, and ours reach it only if
///   `FUSE_INIT_EXT` is granted; `max_write` is `ours.max_write`, or at most 32 pages
///   without `FUSE_MAX_PAGES` (the kernel's request limit then); `max_pages` covers
///   `max_write`; `time_gran` is 1 ns; the reply is cut to `init_out_size(minor)` (24
///   bytes below 7.23, as QEMU and libfuse do).
///
/// The error is a positive errno (`libc::EINVAL`), for [`Reply::err`].
///
/// # Panics
///
/// If `ours.page_size` is not a power of two (a configuration bug).
///
/// QEMU: block/export/fuse.c, fuse_co_init(); libfuse: lib/fuse_lowlevel.c, do_init()
pub fn negotiate_init(kernel: &fuse_init_in, ours: &InitConfig) -> Result<InitReply, i32> {
    assert!(
        ours.page_size.is_power_of_two(),
        "page size {} is not a power of two",
        ours.page_size
    );
    if kernel.major > FUSE_KERNEL_VERSION {
        let out = fuse_init_out {
            major: FUSE_KERNEL_VERSION,
            minor: FUSE_KERNEL_MINOR_VERSION,
            ..Default::default()
        };
        return Ok(InitReply {
            out,
            len: FUSE_COMPAT_INIT_OUT_SIZE,
            negotiated: None,
        });
    }
    if kernel.major < FUSE_KERNEL_VERSION || kernel.minor < MIN_SUPPORTED_MINOR {
        return Err(libc::EINVAL);
    }
    let minor = kernel.minor.min(FUSE_KERNEL_MINOR_VERSION);

    let mut requested = u64::from(kernel.flags);
    if requested & FUSE_INIT_EXT != 0 {
        // Zero when the kernel did not send it (before 7.36), see request::parse.
        requested |= u64::from(kernel.flags2) << 32;
    }
    let mut granted = requested & ours.flags & !FUSE_INIT_RESERVED;
    if granted & FUSE_INIT_EXT == 0 {
        granted &= u64::from(u32::MAX);
    }

    let max_pages_granted = granted & FUSE_MAX_PAGES != 0;
    // The kernel's request limit in pages: ours with FUSE_MAX_PAGES, its default without.
    let page_limit = if max_pages_granted {
        u16::MAX
    } else {
        FUSE_DEFAULT_MAX_PAGES_PER_REQ
    };
    let byte_limit = ours
        .page_size
        .saturating_mul(u32::from(page_limit))
        .max(MIN_MAX_WRITE);
    let max_write = ours.max_write.clamp(MIN_MAX_WRITE, byte_limit);
    let max_pages = if max_pages_granted {
        u16::try_from(max_write.div_ceil(ours.page_size)).unwrap_or(u16::MAX)
    } else {
        FUSE_DEFAULT_MAX_PAGES_PER_REQ
    };
    let max_readahead = kernel.max_readahead.min(ours.max_readahead);

    let out = fuse_init_out {
        major: FUSE_KERNEL_VERSION,
        minor,
        max_readahead,
        flags: granted as u32,
        max_background: ours.max_background,
        congestion_threshold: ours.congestion_threshold,
        max_write,
        time_gran: 1,
        max_pages: if max_pages_granted { max_pages } else { 0 },
        flags2: (granted >> 32) as u32,
        ..Default::default()
    };
    let negotiated = Negotiated {
        minor,
        flags: granted,
        max_write,
        max_readahead,
        max_pages,
    };
    Ok(InitReply {
        out,
        len: init_out_size(minor),
        negotiated: Some(negotiated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    fn concat(slices: &[IoSlice<'_>]) -> Vec<u8> {
        slices.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn ok_reply_counts_header_and_payload() {
        let a = [1u8; 16];
        let b = [2u8; 100];
        let reply = Reply::ok(42, &[&a, &b]);
        assert_eq!(reply.header().len, 16 + 16 + 100);
        assert_eq!(reply.wire_len(), 132);
        assert_eq!(reply.header().error, 0);
        assert_eq!(reply.header().unique, 42);
        let iov = reply.io_slices();
        assert_eq!(iov.len(), 3);
        let bytes = concat(&iov);
        assert_eq!(bytes.len(), 132);
        let (header, rest) = fuse_out_header::read_from_prefix(&bytes).unwrap();
        assert_eq!(header, *reply.header());
        assert_eq!(&rest[..16], &a);
        assert_eq!(&rest[16..], &b);
    }

    #[test]
    fn empty_pieces_are_left_out_of_the_iovecs() {
        let reply = Reply::ok(1, &[&[], b"xyz", &[]]);
        assert_eq!(reply.wire_len(), 19);
        let iov = reply.io_slices();
        assert_eq!(iov.len(), 2);
        assert_eq!(&concat(&iov)[16..], b"xyz");
    }

    #[test]
    fn empty_ok_reply_is_just_the_header() {
        let reply = Reply::ok(7, &[]);
        assert_eq!(reply.wire_len(), 16);
        assert_eq!(reply.io_slices().len(), 1);
    }

    #[test]
    fn error_reply_is_negated_and_header_only() {
        let reply = Reply::err(9, libc::ENOENT);
        assert_eq!(
            *reply.header(),
            fuse_out_header {
                len: 16,
                error: -libc::ENOENT,
                unique: 9
            }
        );
        assert_eq!(concat(&reply.io_slices()), reply.header().as_bytes());
        assert_eq!(Reply::new(9, -511, &[]).header().error, -511);
    }

    #[test]
    #[should_panic(expected = "no payload")]
    fn error_reply_with_payload_panics() {
        Reply::new(1, -libc::EIO, &[b"x"]);
    }

    #[test]
    #[should_panic(expected = "not 0 or a negative errno")]
    fn positive_error_panics() {
        Reply::new(1, libc::EIO, &[]);
    }

    #[test]
    #[should_panic(expected = "not 0 or a negative errno")]
    fn error_beyond_the_kernel_limit_panics() {
        Reply::new(1, -512, &[]);
    }

    #[test]
    #[should_panic(expected = "too many reply slices")]
    fn too_many_slices_panics() {
        Reply::ok(1, &[b"a", b"b", b"c", b"d"]);
    }

    #[test]
    fn compat_truncation_helpers() {
        assert_eq!(attr_out_bytes(&fuse_attr_out::default(), 8).len(), 96);
        assert_eq!(attr_out_bytes(&fuse_attr_out::default(), 45).len(), 104);
        assert_eq!(entry_out_bytes(&fuse_entry_out::default(), 8).len(), 120);
        assert_eq!(entry_out_bytes(&fuse_entry_out::default(), 9).len(), 128);
        assert_eq!(statfs_out_bytes(&fuse_statfs_out::default(), 45).len(), 80);
    }

    /// What a kernel at `minor` sends: the flags it had then, `flags2` only from 7.36.
    fn kernel_init(minor: u32) -> fuse_init_in {
        let mut flags = FUSE_ASYNC_READ | FUSE_POSIX_LOCKS | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES;
        if minor >= 22 {
            flags |= FUSE_ASYNC_DIO;
        }
        if minor >= 23 {
            flags |= FUSE_WRITEBACK_CACHE;
        }
        if minor >= 28 {
            flags |= FUSE_MAX_PAGES;
        }
        let mut init = fuse_init_in {
            major: 7,
            minor,
            max_readahead: 128 << 10,
            ..Default::default()
        };
        if minor >= 36 {
            flags |= FUSE_INIT_EXT | FUSE_SECURITY_CTX | FUSE_HAS_RESEND;
            init.flags2 = (flags >> 32) as u32;
        }
        init.flags = flags as u32;
        init
    }

    fn negotiate(minor: u32) -> (InitReply, Negotiated) {
        let reply = negotiate_init(&kernel_init(minor), &InitConfig::default()).unwrap();
        let negotiated = *reply.negotiated().expect("a session");
        (reply, negotiated)
    }

    #[test]
    fn init_minor_9() {
        let (reply, n) = negotiate(9);
        assert_eq!(n.minor, 9);
        assert_eq!(n.flags, FUSE_ASYNC_READ | FUSE_BIG_WRITES);
        assert_eq!(n.max_write, 128 << 10, "32 pages without FUSE_MAX_PAGES");
        assert_eq!(n.max_pages, 32);
        assert_eq!(reply.as_bytes().len(), FUSE_COMPAT_22_INIT_OUT_SIZE);
        assert_eq!(reply.as_bytes(), &reply.out().as_bytes()[..24]);
        // The 24 bytes hold major, minor, readahead, flags, background limits, max_write.
        let bytes = reply.as_bytes();
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_ne_bytes(bytes[20..24].try_into().unwrap()),
            128 << 10
        );
    }

    #[test]
    fn init_minor_22_grants_async_dio_in_the_short_reply() {
        let (reply, n) = negotiate(22);
        assert_eq!(n.minor, 22);
        assert_eq!(n.flags, FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO);
        assert_eq!(reply.as_bytes().len(), 24);
        assert_eq!(reply.out().max_background, u16::MAX);
        assert_eq!(reply.out().congestion_threshold, 49151);
    }

    #[test]
    fn init_minor_23_gets_the_full_reply() {
        let (reply, n) = negotiate(23);
        assert_eq!(n.minor, 23);
        assert_eq!(reply.as_bytes().len(), 64);
        assert_eq!(reply.out().time_gran, 1);
        assert_eq!(n.flags & FUSE_WRITEBACK_CACHE, 0, "not offered");
        assert_eq!(reply.out().max_pages, 0);
        assert_eq!(n.max_write, 128 << 10);
    }

    #[test]
    fn init_minor_31_grants_max_pages() {
        let (reply, n) = negotiate(31);
        assert_eq!(n.minor, 31);
        assert_eq!(
            n.flags,
            FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES
        );
        assert_eq!(n.max_write, 1 << 20);
        assert_eq!(n.max_pages, 256);
        assert_eq!(reply.out().max_pages, 256);
        assert_eq!(reply.out().max_write, 1 << 20);
        assert_eq!(reply.out().flags2, 0);
        assert_eq!(reply.as_bytes().len(), 64);
    }

    #[test]
    fn init_minor_45_uses_init_ext() {
        let (reply, n) = negotiate(45);
        assert_eq!(n.minor, 45);
        assert_eq!(n.flags, OFFERED_INIT_FLAGS);
        assert_eq!(reply.out().flags as u64, OFFERED_INIT_FLAGS);
        assert_eq!(reply.out().flags2, 0, "we offer no flags2 bits by default");
        assert_eq!(n.max_pages, 256);
        assert_eq!(
            n.max_readahead,
            128 << 10,
            "the kernel's smaller readahead wins"
        );
    }

    #[test]
    fn init_newer_kernel_gets_our_minor() {
        let (reply, n) = negotiate(50);
        assert_eq!(n.minor, FUSE_KERNEL_MINOR_VERSION);
        assert_eq!(reply.out().minor, 45);
        assert_eq!(reply.as_bytes().len(), 64);
    }

    #[test]
    fn init_minor_8_is_refused() {
        assert_eq!(
            negotiate_init(&kernel_init(8), &InitConfig::default()),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn init_major_6_is_refused() {
        let init = fuse_init_in {
            major: 6,
            minor: 45,
            ..Default::default()
        };
        assert_eq!(
            negotiate_init(&init, &InitConfig::default()),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn init_newer_major_is_answered_with_our_version_only() {
        let init = fuse_init_in {
            major: 8,
            minor: 3,
            flags: u32::MAX,
            ..Default::default()
        };
        let reply = negotiate_init(&init, &InitConfig::default()).unwrap();
        assert_eq!(reply.negotiated(), None);
        assert_eq!(reply.as_bytes().len(), FUSE_COMPAT_INIT_OUT_SIZE);
        let (out, _) = fuse_init_out::read_from_prefix(reply.out().as_bytes()).unwrap();
        assert_eq!((out.major, out.minor, out.flags), (7, 45, 0));
    }

    #[test]
    fn flags2_counts_only_with_init_ext_on_both_sides() {
        let ours = InitConfig {
            flags: OFFERED_INIT_FLAGS | FUSE_HAS_RESEND,
            ..Default::default()
        };
        let reply = negotiate_init(&kernel_init(45), &ours).unwrap();
        assert_eq!(reply.out().flags2, (FUSE_HAS_RESEND >> 32) as u32);
        assert_ne!(reply.negotiated().unwrap().flags & FUSE_HAS_RESEND, 0);

        let mut kernel = kernel_init(45);
        kernel.flags &= !(FUSE_INIT_EXT as u32);
        let reply = negotiate_init(&kernel, &ours).unwrap();
        assert_eq!(
            reply.out().flags2,
            0,
            "flags2 ignored without the kernel's INIT_EXT"
        );
        assert_eq!(reply.negotiated().unwrap().flags & FUSE_INIT_EXT, 0);

        let ours = InitConfig {
            flags: FUSE_ASYNC_READ | FUSE_HAS_RESEND,
            ..Default::default()
        };
        let reply = negotiate_init(&kernel_init(45), &ours).unwrap();
        assert_eq!(reply.negotiated().unwrap().flags, FUSE_ASYNC_READ);
        assert_eq!(
            reply.out().flags2,
            0,
            "no way to send flags2 without INIT_EXT"
        );
    }

    #[test]
    fn max_write_is_clamped_and_rounded_to_pages() {
        let small = InitConfig {
            max_write: 1000,
            ..Default::default()
        };
        let n = *negotiate_init(&kernel_init(45), &small)
            .unwrap()
            .negotiated()
            .unwrap();
        assert_eq!((n.max_write, n.max_pages), (4096, 1));

        let odd = InitConfig {
            max_write: 100_000,
            ..Default::default()
        };
        let n = *negotiate_init(&kernel_init(45), &odd)
            .unwrap()
            .negotiated()
            .unwrap();
        assert_eq!((n.max_write, n.max_pages), (100_000, 25));
    }
}
