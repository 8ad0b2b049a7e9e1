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
