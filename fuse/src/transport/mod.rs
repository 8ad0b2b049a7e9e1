//! Transports: how requests arrive from the kernel and how replies go back. Everything a
//! request does once its bytes are here is the session's and the export's, the same for every
//! transport.
//!
//! - [`dev`]: the classic one — a `/dev/fuse` fd per queue thread (the mount's, or a clone),
//!   read with `read(2)` when the thread's event loop says it is readable, replies written with
//!   `writev(2)`. QEMU: `block/export/fuse.c` (`read_from_fuse_fd()`, `fuse_write_response()`).
//! - [`uring`]: FUSE over io_uring (Linux 6.14+) — ring entries per kernel queue, filled by the
//!   kernel and committed back through each queue thread's `AioContext` io_uring; `/dev/fuse`
//!   stays for INIT, FORGET and INTERRUPT.
//! - [`buf`]: the buffers they read requests into and READ replies come from, and their pool.
//!
//! A transport's queue, for each request: take a buffer, read the request into it, count it
//! against the queue's bound, start a coroutine (or task) that runs
//! [`crate::session::Session::co_serve`] and sends the reply, and give the buffer back.

pub mod buf;
pub mod dev;
pub mod uring;

use std::fmt;

use zerocopy::FromBytes;

use crate::protocol::abi::{
    fuse_in_header, fuse_read_in, fuse_write_in, opcode_name, FUSE_READ, FUSE_WRITE,
};

/// A request's header bytes as the trace (`-vv`) names it: `unique 14 READ 4096 bytes at 0`.
/// Parsed only when formatted, so a `log::trace!` that is off costs nothing more.
pub(crate) struct Described<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ok((h, rest)) = fuse_in_header::read_from_prefix(self.0) else {
            return write!(
                f,
                "a request of {} bytes (too short for a header)",
                self.0.len()
            );
        };
        write!(
            f,
            "unique {} {}",
            h.unique,
            opcode_name(h.opcode).unwrap_or("?")
        )?;
        // `offset` and `size` lead both structs in every protocol minor.
        let io = match h.opcode {
            FUSE_READ => fuse_read_in::read_from_prefix(rest)
                .ok()
                .map(|(r, _)| (r.size, r.offset)),
            FUSE_WRITE => fuse_write_in::read_from_prefix(rest)
                .ok()
                .map(|(w, _)| (w.size, w.offset)),
            _ => None,
        };
        match io {
            Some((size, offset)) => write!(f, " {size} bytes at {offset}"),
            None => Ok(()),
        }
    }
}

/// What a reply carries, for trace lines: `4096 bytes`, `error 5`, `no data`.
pub(crate) struct ReplyTrace<'a>(pub(crate) &'a crate::export::Response);

impl fmt::Display for ReplyTrace<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::export::Response;
        match self.0 {
            Response::None => f.write_str("none"),
            Response::Err(e) => write!(f, "error {e}"),
            Response::Bytes(b) => write!(f, "{} bytes", b.len()),
            Response::Data(_, len) => write!(f, "{len} bytes of data"),
            Response::InPlace(len) => write!(f, "{len} bytes of data, read in place"),
        }
    }
}

/// The unique id in a request's header bytes (0 if too short), for trace lines.
pub(crate) fn unique_of(head: &[u8]) -> u64 {
    fuse_in_header::read_from_prefix(head).map_or(0, |(h, _)| h.unique)
}

/// Set by the hidden `--inject-enomem buffer:AFTER:COUNT`.
static FAIL_REQUEST_BUFS: runtime::fault::FailAfter = runtime::fault::FailAfter::new();

/// Test hook: after the next `after` request buffers taken (pooled or not, any queue), the
/// following `count` fail with ENOMEM as if none could be mapped.
pub fn inject_request_buf_failures(after: usize, count: usize) {
    FAIL_REQUEST_BUFS.arm(after, count);
}

/// A request buffer for a queue's next read, or ENOMEM (real, or injected for tests).
fn take_request_buf(max_write: u32) -> std::io::Result<buf::RequestBuf> {
    if FAIL_REQUEST_BUFS.fire() {
        return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
    }
    buf::RequestBuf::take(max_write)
}
