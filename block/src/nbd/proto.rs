//! The NBD wire format: magics, option, command and reply constants, and the pure functions
//! that build requests and check what a server sent (no I/O here, so every check can be fed
//! any bytes: unit tests, the fake server of `block/tests/nbd.rs`, the fuzz target).
//!
//! QEMU: `include/block/nbd.h` (the constants) and the parsing halves of `nbd/client.c`
//! (`nbd_receive_reply()`, `nbd_parse_*_payload()` in `block/nbd.c`). The authority is the
//! protocol document, `doc/proto.md` of the NBD project. Everything on the wire is big-endian.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the server speaks newstyle; also the prefix of every option a client sends.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The old handshake (no options, no export names): not supported.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The prefix of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// A simple reply (16 bytes).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk (20 bytes).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Transmission flags (per export).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The meta context for SEEK_DATA/SEEK_HOLE.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

/// Bytes of a request header and of the two reply headers.
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// The largest payload of a non-data chunk (an error with its message, a block status with one
/// extent) we accept; more is a lying server, not a message worth a big buffer.
pub const MAX_SMALL_PAYLOAD: u32 = 64 * 1024;

/// Something a server sent that the protocol does not allow: the connection cannot be trusted
/// any further and is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shorthand for a [`ProtocolError`].
pub fn violation(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// A request header (`struct nbd_request`).
pub fn encode_request(flags: u16, ty: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of one reply: a simple reply, or one chunk of a structured reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// `struct nbd_simple_reply`: an errno (0: success) and, for a successful read, the
    /// request's length of data after it.
    Simple { error: u32, cookie: u64 },
    /// `struct nbd_structured_reply_chunk`: `length` bytes of payload follow.
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }

    /// Whether this is the last reply to its request.
    pub fn is_final(&self) -> bool {
        match *self {
            ReplyHeader::Simple { .. } => true,
            ReplyHeader::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// What the first 16 bytes of a reply say: a whole simple reply, or the start of a chunk
/// header whose last 4 bytes (the payload length) come next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStart {
    Simple(ReplyHeader),
    /// Flags, type, cookie; call [`finish_chunk_header`] with the next 4 bytes.
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
    },
}

/// Parses the first 16 bytes of a reply. A magic that is neither reply magic is a
/// protocol error (the stream is out of step: a short or oversized earlier reply).
pub fn parse_reply_start(b: &[u8; 16]) -> Result<ReplyStart, ProtocolError> {
    let magic = be32(&b[0..4]);
    let cookie = be64(&b[8..16]);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple(ReplyHeader::Simple {
            error: be32(&b[4..8]),
            cookie,
        })),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Chunk {
            flags: be16(&b[4..6]),
            ty: be16(&b[6..8]),
            cookie,
        }),
        m => Err(violation(format!("bad reply magic {m:#010x}"))),
    }
}

/// Completes a chunk header with its length field.
pub fn finish_chunk_header(start: ReplyStart, len: &[u8; 4]) -> ReplyHeader {
    match start {
        ReplyStart::Simple(h) => h,
        ReplyStart::Chunk { flags, ty, cookie } => ReplyHeader::Chunk {
            flags,
            ty,
            cookie,
            length: u32::from_be_bytes(*len),
        },
    }
}

/// An error chunk's payload (`NBD_REPLY_TYPE_ERROR`, `_ERROR_OFFSET`): the server's errno and
/// message (lossy UTF-8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkError {
    pub error: u32,
    pub message: String,
}

/// Parses an error chunk. Its error must not be 0; its message must fit in the payload; an
/// `_ERROR_OFFSET` chunk carries an offset after the message, which must lie in the request
/// `[req_offset, req_offset + req_len)`.
pub fn parse_error_chunk(
    ty: u16,
    payload: &[u8],
    req_offset: u64,
    req_len: u64,
) -> Result<ChunkError, ProtocolError> {
    if payload.len() < 6 {
        return Err(violation(format!(
            "error chunk of {} bytes (at least 6)",
            payload.len()
        )));
    }
    let error = be32(&payload[0..4]);
    let msg_len = usize::from(be16(&payload[4..6]));
    let extra = if ty == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
    if payload.len() != 6 + msg_len + extra {
        return Err(violation(format!(
            "error chunk of {} bytes with a {msg_len}-byte message",
            payload.len()
        )));
    }
    if error == 0 {
        return Err(violation("error chunk with error 0"));
    }
    if ty == REPLY_TYPE_ERROR_OFFSET {
        let at = be64(&payload[6 + msg_len..]);
        if at < req_offset || at - req_offset >= req_len {
            return Err(violation(format!(
                "error offset {at} outside the request {req_offset}+{req_len}"
            )));
        }
    }
    let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
    Ok(ChunkError { error, message })
}

/// Where a data or hole chunk lands in a read of `[req_offset, req_offset + req_len)`:
/// the byte range of the request's buffer. `offset` is the chunk's, `len` its data length.
pub fn chunk_range(
    offset: u64,
    len: u64,
    req_offset: u64,
    req_len: u64,
) -> Result<std::ops::Range<usize>, ProtocolError> {
    let start = offset.checked_sub(req_offset);
    match start {
        Some(start) if len > 0 && start <= req_len && len <= req_len - start => {
            Ok(start as usize..(start + len) as usize)
        }
        _ => Err(violation(format!(
            "chunk {offset}+{len} outside the read {req_offset}+{req_len}"
        ))),
    }
}

/// Parses a hole chunk's payload (`offset u64, length u32`) into its buffer range.
pub fn parse_hole_chunk(
    payload: &[u8],
    req_offset: u64,
    req_len: u64,
) -> Result<std::ops::Range<usize>, ProtocolError> {
    if payload.len() != 12 {
        return Err(violation(format!(
            "hole chunk of {} bytes (12)",
            payload.len()
        )));
    }
    let offset = be64(&payload[0..8]);
    let len = u64::from(be32(&payload[8..12]));
    chunk_range(offset, len, req_offset, req_len)
}

/// Parses a block-status chunk asked with `NBD_CMD_FLAG_REQ_ONE`: the context id must be
/// ours, and there must be at least one extent of non-zero length; the first one counts
/// (the length clamped to the request's). Returns `(length, flags)`.
pub fn parse_block_status_chunk(
    payload: &[u8],
    context: u32,
    req_len: u64,
) -> Result<(u64, u32), ProtocolError> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(violation(format!(
            "block status chunk of {} bytes",
            payload.len()
        )));
    }
    let id = be32(&payload[0..4]);
    if id != context {
        return Err(violation(format!(
            "block status for meta context {id}, not ours ({context})"
        )));
    }
    let len = u64::from(be32(&payload[4..8]));
    let flags = be32(&payload[8..12]);
    if len == 0 {
        return Err(violation("block status extent of length 0"));
    }
    Ok((len.min(req_len), flags))
}

/// The errno for an NBD error value. The protocol names a few (`NBD_EPERM` …); anything
/// else is `EINVAL`, as the protocol tells clients to treat unknown values.
pub fn errno_of(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let b = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(be64(&b[8..16]), 0x0102_0304_0506_0708);
        assert_eq!(be64(&b[16..24]), 4096);
        assert_eq!(be32(&b[24..28]), 512);
    }

    #[test]
    fn reply_starts() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            parse_reply_start(&b),
            Ok(ReplyStart::Simple(ReplyHeader::Simple {
                error: 5,
                cookie: 9
            }))
        );
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let s = parse_reply_start(&b).unwrap();
        let h = finish_chunk_header(s, &100u32.to_be_bytes());
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                flags: 0,
                ty: 5,
                cookie: 9,
                length: 100
            }
        );
        assert!(!h.is_final());
        b[0] = 0;
        assert!(parse_reply_start(&b).is_err());
    }

    #[test]
    fn error_chunks() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &p, 0, 10).unwrap();
        assert_eq!((e.error, e.message.as_str()), (5, "bad"));
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p[..8], 0, 10).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p, 0, 10).is_err());
        p.extend_from_slice(&7u64.to_be_bytes());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p, 0, 10).is_ok());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p, 8, 10).is_err());
        let mut zero = p.clone();
        zero[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &zero, 0, 10).is_err());
    }

    #[test]
    fn chunk_ranges() {
        assert_eq!(chunk_range(100, 10, 100, 20), Ok(0..10));
        assert_eq!(chunk_range(110, 10, 100, 20), Ok(10..20));
        assert!(chunk_range(111, 10, 100, 20).is_err());
        assert!(chunk_range(99, 1, 100, 20).is_err());
        assert!(chunk_range(100, 0, 100, 20).is_err());
        assert!(chunk_range(u64::MAX, u64::MAX, 100, 20).is_err());
    }

    #[test]
    fn block_status() {
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&STATE_HOLE.to_be_bytes());
        assert_eq!(parse_block_status_chunk(&p, 1, 100), Ok((100, STATE_HOLE)));
        assert!(parse_block_status_chunk(&p, 2, 100).is_err());
        assert!(parse_block_status_chunk(&p[..10], 1, 100).is_err());
        p[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_block_status_chunk(&p, 1, 100).is_err());
    }
}
