//! Parsing one FUSE request into a typed, borrowed view.
//!
//! This module owns the step between "bytes read from `/dev/fuse`" and "a handler runs":
//! [`parse`] checks the framing (`fuse_in_header.len` against the bytes read), reads the
//! argument struct of the opcode and returns a [`Request`] whose [`Operation`] borrows the
//! variable parts (a LOOKUP name, WRITE data, BATCH_FORGET entries) from the read buffers.
//! It mirrors the request layouts of the kernel's `include/uapi/linux/fuse.h` and the
//! decoding at the top of QEMU's `block/export/fuse.c` (`fuse_co_process_request()`);
//! the opcode-to-variant mapping follows fuser's `src/ll/request.rs`.
//!
//! Untrusted bytes never panic: a short or inconsistent request is a [`ParseError`]. The
//! caller treats a framing error (`ShortHeader`, `LengthMismatch`) as "halt the export",
//! as QEMU does, since the stream can no longer be trusted. Argument structs are *copied*
//! out of the buffer (`read_from_prefix`), so the buffers need no particular alignment.
//!
//! # Two buffers
//!
//! The read handler may hand the kernel two iovecs: a small first one for the header and
//! the fixed arguments, and a large, reusable, suitably aligned second one, so that WRITE
//! data lands directly where the block layer can use it without a copy. Hence
//! `parse(header_and_args, write_payload, minor)`:
//!
//! - `header_and_args` holds the header and all arguments of every non-WRITE request, and
//!   the header plus `fuse_write_in` of a WRITE (optionally with the data inline too);
//! - `write_payload` holds WRITE data and must be empty for every other opcode.
//!
//! With a split read of exactly [`WRITE_HEADER_SIZE`] bytes in the first iovec, WRITE data
//! is entirely in the second buffer; other requests longer than that spill into it and the
//! reader has to make them contiguous first (e.g. by reserving `WRITE_HEADER_SIZE` bytes in
//! front of the payload area and copying the head there). A reader with one buffer passes
//! it whole with an empty `write_payload`.
//!
//! # Protocol minor
//!
//! `minor` is the negotiated protocol minor (see `reply::negotiate_init`); INIT itself is
//! parsed according to the minor it announces. We require minor ≥ 9, from which on every
//! argument struct used here has its current size: `fuse_read_in` and `fuse_write_in` 40
//! bytes, `fuse_getattr_in` 16, `fuse_release_in` 24 (they grew at 7.9 and 7.8). The older
//! sizes are still applied when `minor` asks for them, read from the [`abi::SizeByMinor`]
//! tables; missing trailing fields are then zero.
//!
//! Trailing bytes after a fixed argument struct are ignored (as libfuse does); request
//! extensions (`total_extlen`, 7.38) are only sent with features we never grant.

use core::ffi::CStr;
use core::fmt;
use core::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::protocol::abi::{self, *};

/// Size of `fuse_in_header` plus `fuse_write_in`: the first iovec of a split read, after
/// which WRITE data begins.
pub const WRITE_HEADER_SIZE: usize = size_of::<fuse_in_header>() + size_of::<fuse_write_in>();

/// Smallest total read buffer the kernel accepts once `max_write` is negotiated: it refuses
/// reads into less than `max(FUSE_MIN_READ_BUFFER, header + fuse_write_in + max_write)`.
pub const fn request_buffer_size(max_write: u32) -> usize {
    let needed = WRITE_HEADER_SIZE + max_write as usize;
    if needed > FUSE_MIN_READ_BUFFER {
        needed
    } else {
        FUSE_MIN_READ_BUFFER
    }
}

/// One parsed request: a copy of its header and the typed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request header (copied).
    pub header: fuse_in_header,
    /// What the kernel asks for.
    pub op: Operation<'a>,
}

impl Request<'_> {
    /// Request id, to be echoed in the reply.
    pub fn unique(&self) -> u64 {
        self.header.unique
    }

    /// Inode the request is about.
    pub fn nodeid(&self) -> u64 {
        self.header.nodeid
    }
}

/// The operations this export understands, one variant per opcode, with typed arguments.
///
/// Fixed-size argument structs are copies; variable parts borrow from the read buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    /// `FUSE_INIT`: the handshake. Fields the kernel did not send (older minors) are zero.
    Init(fuse_init_in),
    /// `FUSE_DESTROY`: the session ends (unmount).
    Destroy,
    /// `FUSE_STATFS`.
    Statfs,
    /// `FUSE_OPEN`.
    Open(fuse_open_in),
    /// `FUSE_RELEASE`.
    Release(fuse_release_in),
    /// `FUSE_LOOKUP` of `name` in directory `header.nodeid`.
    Lookup {
        /// The name, without its NUL.
        name: &'a CStr,
    },
    /// `FUSE_FORGET` (no reply).
    Forget(fuse_forget_in),
    /// `FUSE_BATCH_FORGET` (no reply).
    BatchForget {
        /// The `count` entries, bounds-checked.
        forgets: Forgets<'a>,
    },
    /// `FUSE_GETATTR`.
    Getattr(fuse_getattr_in),
    /// `FUSE_SETATTR`.
    Setattr(fuse_setattr_in),
    /// `FUSE_READ`.
    Read(fuse_read_in),
    /// `FUSE_WRITE`; `data.len() == arg.size` is checked.
    Write {
        /// The fixed argument.
        arg: fuse_write_in,
        /// The data to write, from whichever buffer holds it.
        data: &'a [u8],
    },
    /// `FUSE_FALLOCATE`.
    Fallocate(fuse_fallocate_in),
    /// `FUSE_FSYNC`.
    Fsync(fuse_fsync_in),
    /// `FUSE_FLUSH`.
    Flush(fuse_flush_in),
    /// `FUSE_LSEEK`.
    Lseek(fuse_lseek_in),
    /// `FUSE_INTERRUPT` (no reply needed; we ignore it).
    Interrupt(fuse_interrupt_in),
    /// `FUSE_OPENDIR`.
    Opendir(fuse_open_in),
    /// `FUSE_READDIR`.
    Readdir(fuse_read_in),
    /// `FUSE_RELEASEDIR`.
    Releasedir(fuse_release_in),
    /// Any other opcode; the caller replies ENOSYS. Its arguments are not looked at.
    Unknown(u32),
}

impl Operation<'_> {
    /// Whether the kernel expects a reply. FORGET and BATCH_FORGET must not be answered;
    /// INTERRUPT is not answered either (a reply would only be meaningful as EAGAIN, "try
    /// again later", which we never need).
    pub fn needs_reply(&self) -> bool {
        !matches!(
            self,
            Operation::Forget(_) | Operation::BatchForget { .. } | Operation::Interrupt(_)
        )
    }
}

/// The entries of a BATCH_FORGET: `len()` `fuse_forget_one`, read on iteration (copies,
/// so the buffer needs no alignment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forgets<'a> {
    bytes: &'a [u8],
}

impl<'a> Forgets<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.bytes.len() / size_of::<fuse_forget_one>()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The entries in order.
    pub fn iter(&self) -> ForgetIter<'a> {
        ForgetIter { bytes: self.bytes }
    }
}

impl<'a> IntoIterator for Forgets<'a> {
    type Item = fuse_forget_one;
    type IntoIter = ForgetIter<'a>;

    fn into_iter(self) -> ForgetIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Forgets`].
#[derive(Clone, Debug)]
pub struct ForgetIter<'a> {
    bytes: &'a [u8],
}

impl Iterator for ForgetIter<'_> {
    type Item = fuse_forget_one;

    fn next(&mut self) -> Option<fuse_forget_one> {
        let (one, rest) = fuse_forget_one::read_from_prefix(self.bytes).ok()?;
        self.bytes = rest;
        Some(one)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.bytes.len() / size_of::<fuse_forget_one>();
        (n, Some(n))
    }
}

impl ExactSizeIterator for ForgetIter<'_> {}

/// Why a request could not be parsed. `ShortHeader` and `LengthMismatch` mean the framing
/// is broken (halt the export); the others are a malformed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than a `fuse_in_header` in the first buffer.
    ShortHeader {
        /// Bytes available.
        len: usize,
    },
    /// `fuse_in_header.len` differs from the number of bytes read.
    LengthMismatch {
        /// What the header says.
        header_len: u32,
        /// What was read (both buffers).
        read: usize,
    },
    /// The arguments of `opcode` are shorter than its argument struct.
    ShortArgument {
        /// The request's opcode.
        opcode: u32,
        /// Bytes the argument struct needs at this protocol minor.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// A name argument has no terminating NUL.
    MissingNul {
        /// The request's opcode.
        opcode: u32,
    },
    /// BATCH_FORGET announces more entries than the request holds.
    ForgetCountTooLarge {
        /// `fuse_batch_forget_in.count`.
        count: u32,
        /// Bytes present after `fuse_batch_forget_in`.
        got: usize,
    },
    /// WRITE data length differs from `fuse_write_in.size`.
    WriteSizeMismatch {
        /// `fuse_write_in.size`.
        declared: u32,
        /// Data bytes present.
        got: usize,
    },
    /// WRITE data is partly inline and partly in the payload buffer (a read-side bug: the
    /// first iovec must end at the data or hold all of it).
    SplitWriteData {
        /// Data bytes after `fuse_write_in` in the first buffer.
        inline: usize,
        /// Bytes in the payload buffer.
        payload: usize,
    },
    /// A request other than WRITE came with bytes in the payload buffer.
    UnexpectedPayload {
        /// The request's opcode.
        opcode: u32,
        /// Bytes in the payload buffer.
        len: usize,
    },
}

/// Displays an opcode by its kernel name when it has one.
struct OpName(u32);

impl fmt::Display for OpName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match abi::opcode_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "opcode {}", self.0),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParseError::ShortHeader { len } => {
                write!(f, "request of {len} bytes is shorter than fuse_in_header")
            }
            ParseError::LengthMismatch { header_len, read } => {
                write!(
                    f,
                    "request header says {header_len} bytes but {read} were read"
                )
            }
            ParseError::ShortArgument { opcode, need, got } => write!(
                f,
                "arguments of {} too short: need {need} bytes, got {got}",
                OpName(opcode)
            ),
            ParseError::MissingNul { opcode } => {
                write!(
                    f,
                    "name argument of {} is not NUL-terminated",
                    OpName(opcode)
                )
            }
            ParseError::ForgetCountTooLarge { count, got } => write!(
                f,
                "batch forget of {count} entries carries only {got} bytes of entries"
            ),
            ParseError::WriteSizeMismatch { declared, got } => {
                write!(f, "write of {declared} bytes carries {got} bytes of data")
            }
            ParseError::SplitWriteData { inline, payload } => write!(
                f,
                "write data split between buffers ({inline} bytes inline, {payload} in payload)"
            ),
            ParseError::UnexpectedPayload { opcode, len } => write!(
                f,
                "request {} has {len} unexpected bytes in the payload buffer",
                OpName(opcode)
            ),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses one request read from `/dev/fuse`.
///
/// `header_and_args` and `write_payload` are the bytes the read returned, split as the
/// module doc describes (`write_payload` empty unless the request is a WRITE read into two
/// iovecs). `minor` is the negotiated protocol minor; it decides the argument sizes of
/// READ, WRITE, GETATTR, RELEASE(DIR) and READDIR (see [`abi::SizeByMinor`]).
///
/// QEMU: block/export/fuse.c, fuse_co_process_request()
pub fn parse<'a>(
    header_and_args: &'a [u8],
    write_payload: &'a [u8],
    minor: u32,
) -> Result<Request<'a>, ParseError> {
    let read = header_and_args.len() + write_payload.len();
    let (header, rest) =
        fuse_in_header::read_from_prefix(header_and_args).map_err(|_| ParseError::ShortHeader {
            len: header_and_args.len(),
        })?;
    if header.len as usize != read {
        return Err(ParseError::LengthMismatch {
            header_len: header.len,
            read,
        });
    }
    let opcode = header.opcode;
    if opcode != FUSE_WRITE && !write_payload.is_empty() {
        return Err(ParseError::UnexpectedPayload {
            opcode,
            len: write_payload.len(),
        });
    }

    let mut args = Args {
        bytes: rest,
        opcode,
    };
    let op = match opcode {
        FUSE_INIT => Operation::Init(args.init()?),
        FUSE_DESTROY => Operation::Destroy,
        FUSE_STATFS => Operation::Statfs,
        FUSE_OPEN => Operation::Open(args.full()?),
        FUSE_RELEASE => Operation::Release(args.sized(release_in_size(minor))?),
        FUSE_LOOKUP => Operation::Lookup { name: args.name()? },
        FUSE_FORGET => Operation::Forget(args.full()?),
        FUSE_BATCH_FORGET => Operation::BatchForget {
            forgets: args.forgets()?,
        },
        FUSE_GETATTR => Operation::Getattr(args.sized(getattr_in_size(minor))?),
        FUSE_SETATTR => Operation::Setattr(args.full()?),
        FUSE_READ => Operation::Read(args.sized(read_in_size(minor))?),
        FUSE_WRITE => {
            let arg: fuse_write_in = args.sized(write_in_size(minor))?;
            let data = write_data(args.bytes, write_payload)?;
            if data.len() != arg.size as usize {
                return Err(ParseError::WriteSizeMismatch {
                    declared: arg.size,
                    got: data.len(),
                });
            }
            Operation::Write { arg, data }
        }
        FUSE_FALLOCATE => Operation::Fallocate(args.full()?),
        FUSE_FSYNC => Operation::Fsync(args.full()?),
        FUSE_FLUSH => Operation::Flush(args.full()?),
        FUSE_LSEEK => Operation::Lseek(args.full()?),
        FUSE_INTERRUPT => Operation::Interrupt(args.full()?),
        FUSE_OPENDIR => Operation::Opendir(args.full()?),
        FUSE_READDIR => Operation::Readdir(args.sized(read_in_size(minor))?),
        FUSE_RELEASEDIR => Operation::Releasedir(args.sized(release_in_size(minor))?),
        other => Operation::Unknown(other),
    };
    Ok(Request { header, op })
}

/// Picks WRITE data from the bytes after `fuse_write_in` or from the payload buffer.
fn write_data<'a>(inline: &'a [u8], payload: &'a [u8]) -> Result<&'a [u8], ParseError> {
    match (inline.is_empty(), payload.is_empty()) {
        (_, true) => Ok(inline),
        (true, false) => Ok(payload),
        (false, false) => Err(ParseError::SplitWriteData {
            inline: inline.len(),
            payload: payload.len(),
        }),
    }
}

/// The argument bytes after the header, consumed front to back.
struct Args<'a> {
    bytes: &'a [u8],
    opcode: u32,
}

impl<'a> Args<'a> {
    /// Reads a `T` of which the kernel sends the first `wire_size` bytes; the remaining
    /// fields (present only in newer minors) are zero.
    fn sized<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
        &mut self,
        wire_size: usize,
    ) -> Result<T, ParseError> {
        // A table entry larger than the struct would be a bug in abi.rs, not bad input.
        assert!(wire_size <= size_of::<T>(), "wire size exceeds the struct");
        if self.bytes.len() < wire_size {
            return Err(ParseError::ShortArgument {
                opcode: self.opcode,
                need: wire_size,
                got: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(wire_size);
        let mut value = T::new_zeroed();
        value.as_mut_bytes()[..wire_size].copy_from_slice(head);
        self.bytes = rest;
        Ok(value)
    }

    /// Reads a `T` that has had the same size in every minor we can meet.
    fn full<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
        &mut self,
    ) -> Result<T, ParseError> {
        self.sized(size_of::<T>())
    }

    /// `fuse_init_in`, whose size depends on the minor it announces itself: the first
    /// 8 bytes (major, minor) are always there; a kernel with another major is answered
    /// from those alone. A newer kernel may send more than we know; the rest is ignored.
    fn init(&mut self) -> Result<fuse_init_in, ParseError> {
        let mut peek = Args {
            bytes: self.bytes,
            opcode: self.opcode,
        };
        let version: fuse_init_in = peek.sized(COMPAT_INIT_IN_SIZE)?;
        let need = if version.major == FUSE_KERNEL_VERSION {
            init_in_size(version.minor)
        } else {
            COMPAT_INIT_IN_SIZE
        };
        let take = self.bytes.len().clamp(need, size_of::<fuse_init_in>());
        self.sized(take)
    }

    /// A NUL-terminated name (bytes after the NUL are ignored).
    fn name(&mut self) -> Result<&'a CStr, ParseError> {
        let name = CStr::from_bytes_until_nul(self.bytes).map_err(|_| ParseError::MissingNul {
            opcode: self.opcode,
        })?;
        self.bytes = &self.bytes[name.to_bytes_with_nul().len()..];
        Ok(name)
    }

    /// `fuse_batch_forget_in` and the `count` entries after it.
    fn forgets(&mut self) -> Result<Forgets<'a>, ParseError> {
        let head: fuse_batch_forget_in = self.full()?;
        let too_large = ParseError::ForgetCountTooLarge {
            count: head.count,
            got: self.bytes.len(),
        };
        let len = (head.count as usize)
            .checked_mul(size_of::<fuse_forget_one>())
            .ok_or(too_large)?;
        if len > self.bytes.len() {
            return Err(too_large);
        }
        let (entries, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(Forgets { bytes: entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINOR: u32 = FUSE_KERNEL_MINOR_VERSION;
    const UNIQUE: u64 = 0x1234_5678;
    const NODE: u64 = 2;

    /// A request as the kernel would send it: header with the right `len`, then `parts`.
    fn request(opcode: u32, parts: &[&[u8]]) -> Vec<u8> {
        let len = size_of::<fuse_in_header>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = fuse_in_header {
            len: len.try_into().unwrap(),
            opcode,
            unique: UNIQUE,
            nodeid: NODE,
            uid: 1000,
            gid: 100,
            pid: 4242,
            ..Default::default()
        };
        let mut buf = header.as_bytes().to_vec();
        for part in parts {
            buf.extend_from_slice(part);
        }
        buf
    }

    /// Rewrites `fuse_in_header.len`.
    fn set_len(buf: &mut [u8], len: usize) {
        buf[..4].copy_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
    }

    fn parse_one(buf: &[u8]) -> Result<Request<'_>, ParseError> {
        parse(buf, &[], MINOR)
    }

    fn op_of(buf: &[u8]) -> Operation<'_> {
        parse_one(buf).expect("request parses").op
    }

    fn write_in(size: u32) -> fuse_write_in {
        fuse_write_in {
            fh: 7,
            offset: 4096,
            size,
            lock_owner: 99,
            flags: 2,
            ..Default::default()
        }
    }

    fn read_in() -> fuse_read_in {
        fuse_read_in {
            fh: 7,
            offset: 1 << 20,
            size: 65536,
            flags: 2,
            ..Default::default()
        }
    }

    fn release_in() -> fuse_release_in {
        fuse_release_in {
            fh: 7,
            flags: 2,
            release_flags: FUSE_RELEASE_FLUSH,
            lock_owner: 5,
        }
    }

    #[test]
    fn header_is_copied_out() {
        let buf = request(FUSE_STATFS, &[]);
        let req = parse_one(&buf).unwrap();
        assert_eq!(req.unique(), UNIQUE);
        assert_eq!(req.nodeid(), NODE);
        assert_eq!(
            (req.header.uid, req.header.gid, req.header.pid),
            (1000, 100, 4242)
        );
        assert_eq!(req.op, Operation::Statfs);
    }

    #[test]
    fn init_current_kernel() {
        let init = fuse_init_in {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: (FUSE_ASYNC_READ | FUSE_INIT_EXT) as u32,
            flags2: 1,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[init.as_bytes()]);
        assert_eq!(op_of(&buf), Operation::Init(init));
    }

    #[test]
    fn init_pre_7_36_kernel_sends_16_bytes() {
        let init = fuse_init_in {
            major: 7,
            minor: 31,
            max_readahead: 4096,
            flags: 1,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[&init.as_bytes()[..COMPAT_35_INIT_IN_SIZE]]);
        assert_eq!(op_of(&buf), Operation::Init(init));
    }

    #[test]
    fn init_shorter_than_its_minor_requires() {
        let init = fuse_init_in {
            major: 7,
            minor: 36,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[&init.as_bytes()[..16]]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::ShortArgument {
                opcode: FUSE_INIT,
                need: 64,
                got: 16
            })
        );
        let init = fuse_init_in {
            major: 7,
            minor: 20,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[&init.as_bytes()[..8]]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::ShortArgument {
                opcode: FUSE_INIT,
                need: 16,
                got: 8
            })
        );
        let buf = request(FUSE_INIT, &[&init.as_bytes()[..7]]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::ShortArgument {
                opcode: FUSE_INIT,
                need: 8,
                got: 7
            })
        );
    }

    #[test]
    fn init_of_another_major_needs_only_the_version() {
        let init = fuse_init_in {
            major: 8,
            minor: 0,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[&init.as_bytes()[..8]]);
        assert_eq!(op_of(&buf), Operation::Init(init));
    }

    #[test]
    fn init_longer_than_we_know_is_accepted() {
        let init = fuse_init_in {
            major: 7,
            minor: 99,
            flags: 3,
            ..Default::default()
        };
        let buf = request(FUSE_INIT, &[init.as_bytes(), &[0xff; 16]]);
        assert_eq!(op_of(&buf), Operation::Init(init));
    }

    #[test]
    fn argumentless_opcodes() {
        assert_eq!(op_of(&request(FUSE_DESTROY, &[])), Operation::Destroy);
        assert_eq!(op_of(&request(FUSE_STATFS, &[])), Operation::Statfs);
    }

    #[test]
    fn open_and_opendir() {
        let arg = fuse_open_in {
            flags: libc::O_RDWR as u32,
            open_flags: 0,
        };
        assert_eq!(
            op_of(&request(FUSE_OPEN, &[arg.as_bytes()])),
            Operation::Open(arg)
        );
        assert_eq!(
            op_of(&request(FUSE_OPENDIR, &[arg.as_bytes()])),
            Operation::Opendir(arg)
        );
    }

    #[test]
    fn release_and_releasedir() {
        let arg = release_in();
        assert_eq!(
            op_of(&request(FUSE_RELEASE, &[arg.as_bytes()])),
            Operation::Release(arg)
        );
        assert_eq!(
            op_of(&request(FUSE_RELEASEDIR, &[arg.as_bytes()])),
            Operation::Releasedir(arg)
        );
    }

    #[test]
    fn lookup_name() {
        let buf = request(FUSE_LOOKUP, &[b"disk.img\0"]);
        assert_eq!(op_of(&buf), Operation::Lookup { name: c"disk.img" });
    }

    #[test]
    fn lookup_name_without_nul() {
        let buf = request(FUSE_LOOKUP, &[b"disk.img"]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::MissingNul {
                opcode: FUSE_LOOKUP
            })
        );
        let buf = request(FUSE_LOOKUP, &[]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::MissingNul {
                opcode: FUSE_LOOKUP
            })
        );
    }

    #[test]
    fn forget() {
        let arg = fuse_forget_in { nlookup: 3 };
        assert_eq!(
            op_of(&request(FUSE_FORGET, &[arg.as_bytes()])),
            Operation::Forget(arg)
        );
    }

    #[test]
    fn batch_forget_entries() {
        let head = fuse_batch_forget_in { count: 2, dummy: 0 };
        let a = fuse_forget_one {
            nodeid: 2,
            nlookup: 1,
        };
        let b = fuse_forget_one {
            nodeid: 3,
            nlookup: 5,
        };
        let buf = request(
            FUSE_BATCH_FORGET,
            &[head.as_bytes(), a.as_bytes(), b.as_bytes()],
        );
        let Operation::BatchForget { forgets } = op_of(&buf) else {
            panic!("not a batch forget");
        };
        assert_eq!(forgets.len(), 2);
        assert_eq!(forgets.iter().len(), 2);
        assert_eq!(forgets.iter().collect::<Vec<_>>(), vec![a, b]);
    }

    #[test]
    fn batch_forget_of_zero_entries() {
        let head = fuse_batch_forget_in { count: 0, dummy: 0 };
        let buf = request(FUSE_BATCH_FORGET, &[head.as_bytes()]);
        let Operation::BatchForget { forgets } = op_of(&buf) else {
            panic!("not a batch forget");
        };
        assert!(forgets.is_empty());
        assert_eq!(forgets.into_iter().next(), None);
    }

    #[test]
    fn batch_forget_count_larger_than_the_buffer() {
        let head = fuse_batch_forget_in { count: 3, dummy: 0 };
        let one = fuse_forget_one {
            nodeid: 2,
            nlookup: 1,
        };
        let buf = request(
            FUSE_BATCH_FORGET,
            &[head.as_bytes(), one.as_bytes(), one.as_bytes()],
        );
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::ForgetCountTooLarge { count: 3, got: 32 })
        );
        let head = fuse_batch_forget_in {
            count: u32::MAX,
            dummy: 0,
        };
        let buf = request(FUSE_BATCH_FORGET, &[head.as_bytes()]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::ForgetCountTooLarge {
                count: u32::MAX,
                got: 0
            })
        );
    }

    #[test]
    fn getattr_setattr() {
        let arg = fuse_getattr_in {
            getattr_flags: FUSE_GETATTR_FH,
            dummy: 0,
            fh: 7,
        };
        assert_eq!(
            op_of(&request(FUSE_GETATTR, &[arg.as_bytes()])),
            Operation::Getattr(arg)
        );
        let arg = fuse_setattr_in {
            valid: FATTR_SIZE,
            size: 1 << 30,
            ..Default::default()
        };
        assert_eq!(
            op_of(&request(FUSE_SETATTR, &[arg.as_bytes()])),
            Operation::Setattr(arg)
        );
    }

    #[test]
    fn read_and_readdir() {
        let arg = read_in();
        assert_eq!(
            op_of(&request(FUSE_READ, &[arg.as_bytes()])),
            Operation::Read(arg)
        );
        assert_eq!(
            op_of(&request(FUSE_READDIR, &[arg.as_bytes()])),
            Operation::Readdir(arg)
        );
    }

    #[test]
    fn write_with_inline_data() {
        let data = [0xabu8; 100];
        let arg = write_in(100);
        let buf = request(FUSE_WRITE, &[arg.as_bytes(), &data]);
        assert_eq!(op_of(&buf), Operation::Write { arg, data: &data });
    }

    #[test]
    fn write_with_data_in_the_payload_buffer() {
        let payload = vec![0x5au8; 8192];
        let arg = write_in(8192);
        let mut head = request(FUSE_WRITE, &[arg.as_bytes()]);
        assert_eq!(head.len(), WRITE_HEADER_SIZE);
        set_len(&mut head, WRITE_HEADER_SIZE + payload.len());
        let req = parse(&head, &payload, MINOR).unwrap();
        let Operation::Write { arg: got, data } = req.op else {
            panic!("not a write");
        };
        assert_eq!(got, arg);
        // Borrowed, not copied: the block layer writes straight from the payload buffer.
        assert_eq!(data.as_ptr(), payload.as_ptr());
        assert_eq!(data.len(), payload.len());
    }

    #[test]
    fn write_of_zero_bytes() {
        let arg = write_in(0);
        let buf = request(FUSE_WRITE, &[arg.as_bytes()]);
        assert_eq!(op_of(&buf), Operation::Write { arg, data: &[] });
    }

    #[test]
    fn write_payload_length_mismatch() {
        let buf = request(FUSE_WRITE, &[write_in(100).as_bytes(), &[0; 99]]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::WriteSizeMismatch {
                declared: 100,
                got: 99
            })
        );
        let buf = request(FUSE_WRITE, &[write_in(100).as_bytes(), &[0; 101]]);
        assert_eq!(
            parse_one(&buf),
            Err(ParseError::WriteSizeMismatch {
                declared: 100,
                got: 101
            })
        );
        let mut head = request(FUSE_WRITE, &[write_in(4096).as_bytes()]);
        set_len(&mut head, WRITE_HEADER_SIZE + 4000);
        assert_eq!(
            parse(&head, &[0; 4000], MINOR),
            Err(ParseError::WriteSizeMismatch {
                declared: 4096,
                got: 4000
            })
        );
    }

    #[test]
    fn write_data_split_across_buffers() {
        let mut head = request(FUSE_WRITE, &[write_in(20).as_bytes(), &[1; 10]]);
        set_len(&mut head, WRITE_HEADER_SIZE + 20);
        assert_eq!(
            parse(&head, &[2; 10], MINOR),
            Err(ParseError::SplitWriteData {
                inline: 10,
                payload: 10
            })
        );
    }

    #[test]
    fn payload_buffer_only_for_write() {
        let mut head = request(FUSE_READ, &[read_in().as_bytes()]);
        let len = head.len();
        set_len(&mut head, len + 8);
        assert_eq!(
            parse(&head, &[0; 8], MINOR),
            Err(ParseError::UnexpectedPayload {
                opcode: FUSE_READ,
                len: 8
            })
        );
    }

    #[test]
    fn fallocate_fsync_flush_lseek_interrupt() {
        let arg = fuse_fallocate_in {
            fh: 7,
            offset: 0,
            length: 1 << 20,
            mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            padding: 0,
        };
        assert_eq!(
            op_of(&request(FUSE_FALLOCATE, &[arg.as_bytes()])),
            Operation::Fallocate(arg)
        );
        let arg = fuse_fsync_in {
            fh: 7,
            fsync_flags: FUSE_FSYNC_FDATASYNC,
            padding: 0,
        };
        assert_eq!(
            op_of(&request(FUSE_FSYNC, &[arg.as_bytes()])),
            Operation::Fsync(arg)
        );
        let arg = fuse_flush_in {
            fh: 7,
            lock_owner: 11,
            ..Default::default()
        };
        assert_eq!(
            op_of(&request(FUSE_FLUSH, &[arg.as_bytes()])),
            Operation::Flush(arg)
        );
        let arg = fuse_lseek_in {
            fh: 7,
            offset: 512,
            whence: libc::SEEK_DATA as u32,
            padding: 0,
        };
        assert_eq!(
            op_of(&request(FUSE_LSEEK, &[arg.as_bytes()])),
            Operation::Lseek(arg)
        );
        let arg = fuse_interrupt_in { unique: 77 };
        assert_eq!(
            op_of(&request(FUSE_INTERRUPT, &[arg.as_bytes()])),
            Operation::Interrupt(arg)
        );
    }

    #[test]
    fn unknown_opcodes() {
        let buf = request(FUSE_MKDIR, &[&[0; 8], b"dir\0"]);
        assert_eq!(op_of(&buf), Operation::Unknown(FUSE_MKDIR));
        let buf = request(12345, &[]);
        assert_eq!(op_of(&buf), Operation::Unknown(12345));
    }

    #[test]
    fn trailing_bytes_after_fixed_arguments_are_ignored() {
        let arg = fuse_open_in {
            flags: 2,
            open_flags: 0,
        };
        let buf = request(FUSE_OPEN, &[arg.as_bytes(), &[0xee; 8]]);
        assert_eq!(op_of(&buf), Operation::Open(arg));
    }

    #[test]
    fn header_len_must_equal_bytes_read() {
        let mut buf = request(FUSE_OPEN, &[fuse_open_in::default().as_bytes()]);
        let read = buf.len();
        for header_len in [read - 1, read + 1, 0] {
            set_len(&mut buf, header_len);
            assert_eq!(
                parse_one(&buf),
                Err(ParseError::LengthMismatch {
                    header_len: header_len as u32,
                    read
                })
            );
        }
    }

    #[test]
    fn shorter_than_a_header() {
        let buf = request(FUSE_STATFS, &[]);
        assert_eq!(
            parse_one(&buf[..39]),
            Err(ParseError::ShortHeader { len: 39 })
        );
        assert_eq!(parse_one(&[]), Err(ParseError::ShortHeader { len: 0 }));
    }

    #[test]
    fn every_truncated_argument_is_an_error() {
        let cases: Vec<(u32, Vec<u8>)> = vec![
            (FUSE_OPEN, fuse_open_in::default().as_bytes().to_vec()),
            (FUSE_OPENDIR, fuse_open_in::default().as_bytes().to_vec()),
            (FUSE_RELEASE, release_in().as_bytes().to_vec()),
            (FUSE_RELEASEDIR, release_in().as_bytes().to_vec()),
            (FUSE_FORGET, fuse_forget_in::default().as_bytes().to_vec()),
            (
                FUSE_BATCH_FORGET,
                fuse_batch_forget_in::default().as_bytes().to_vec(),
            ),
            (FUSE_GETATTR, fuse_getattr_in::default().as_bytes().to_vec()),
            (FUSE_SETATTR, fuse_setattr_in::default().as_bytes().to_vec()),
            (FUSE_READ, read_in().as_bytes().to_vec()),
            (FUSE_READDIR, read_in().as_bytes().to_vec()),
            (FUSE_WRITE, write_in(0).as_bytes().to_vec()),
            (
                FUSE_FALLOCATE,
                fuse_fallocate_in::default().as_bytes().to_vec(),
            ),
            (FUSE_FSYNC, fuse_fsync_in::default().as_bytes().to_vec()),
            (FUSE_FLUSH, fuse_flush_in::default().as_bytes().to_vec()),
            (FUSE_LSEEK, fuse_lseek_in::default().as_bytes().to_vec()),
            (
                FUSE_INTERRUPT,
                fuse_interrupt_in::default().as_bytes().to_vec(),
            ),
        ];
        for (opcode, arg) in cases {
            let need = arg.len();
            assert!(
                parse_one(&request(opcode, &[&arg])).is_ok(),
                "{opcode} whole"
            );
            for got in [0, need - 1] {
                assert_eq!(
                    parse_one(&request(opcode, &[&arg[..got]])),
                    Err(ParseError::ShortArgument { opcode, need, got }),
                    "{opcode} cut to {got}"
                );
            }
        }
    }

    #[test]
    fn compat_sizes_before_7_9() {
        // A 7.8 kernel sends 24-byte read/write arguments and no GETATTR argument.
        let arg = read_in();
        let buf = request(FUSE_READ, &[&arg.as_bytes()[..COMPAT_READ_IN_SIZE]]);
        let expected = fuse_read_in {
            flags: 0,
            lock_owner: 0,
            ..arg
        };
        assert_eq!(parse(&buf, &[], 8).unwrap().op, Operation::Read(expected));

        let arg = write_in(3);
        let buf = request(
            FUSE_WRITE,
            &[&arg.as_bytes()[..FUSE_COMPAT_WRITE_IN_SIZE], b"abc"],
        );
        let expected = fuse_write_in {
            flags: 0,
            lock_owner: 0,
            ..arg
        };
        assert_eq!(
            parse(&buf, &[], 8).unwrap().op,
            Operation::Write {
                arg: expected,
                data: b"abc"
            }
        );

        let buf = request(FUSE_GETATTR, &[]);
        assert_eq!(
            parse(&buf, &[], 8).unwrap().op,
            Operation::Getattr(fuse_getattr_in::default())
        );

        // From 7.9 on the short forms are errors.
        let buf = request(FUSE_READ, &[&arg.as_bytes()[..COMPAT_READ_IN_SIZE]]);
        assert_eq!(
            parse(&buf, &[], 9),
            Err(ParseError::ShortArgument {
                opcode: FUSE_READ,
                need: 40,
                got: 24
            })
        );
        let buf = request(FUSE_GETATTR, &[]);
        assert_eq!(
            parse(&buf, &[], 9),
            Err(ParseError::ShortArgument {
                opcode: FUSE_GETATTR,
                need: 16,
                got: 0
            })
        );
    }

    #[test]
    fn which_operations_get_a_reply() {
        assert!(!Operation::Forget(fuse_forget_in::default()).needs_reply());
        let forgets = Forgets { bytes: &[] };
        assert!(!Operation::BatchForget { forgets }.needs_reply());
        assert!(!Operation::Interrupt(fuse_interrupt_in::default()).needs_reply());
        assert!(Operation::Destroy.needs_reply());
        assert!(Operation::Unknown(FUSE_MKDIR).needs_reply());
        assert!(Operation::Read(read_in()).needs_reply());
    }

    #[test]
    fn buffer_size_for_max_write() {
        assert_eq!(request_buffer_size(4096), FUSE_MIN_READ_BUFFER);
        assert_eq!(request_buffer_size(1 << 20), 80 + (1 << 20));
    }

    #[test]
    fn errors_display_in_lower_case() {
        let errors = [
            ParseError::ShortHeader { len: 3 },
            ParseError::LengthMismatch {
                header_len: 1,
                read: 2,
            },
            ParseError::ShortArgument {
                opcode: FUSE_READ,
                need: 40,
                got: 3,
            },
            ParseError::MissingNul {
                opcode: FUSE_LOOKUP,
            },
            ParseError::ForgetCountTooLarge { count: 9, got: 0 },
            ParseError::WriteSizeMismatch {
                declared: 1,
                got: 2,
            },
            ParseError::SplitWriteData {
                inline: 1,
                payload: 2,
            },
            ParseError::UnexpectedPayload {
                opcode: 777,
                len: 2,
            },
        ];
        for error in errors {
            let text = error.to_string();
            assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
        }
        assert_eq!(
            ParseError::ShortArgument {
                opcode: FUSE_READ,
                need: 40,
                got: 3
            }
            .to_string(),
            "arguments of READ too short: need 40 bytes, got 3"
        );
        assert_eq!(
            ParseError::UnexpectedPayload {
                opcode: 777,
                len: 2
            }
            .to_string(),
            "request opcode 777 has 2 unexpected bytes in the payload buffer"
        );
    }
}
