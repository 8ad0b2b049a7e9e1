//! coro-fuse's FUSE side: the kernel ABI, request parsing and reply encoding, mounting, the
//! per-thread queues, the export's semantics and its lifecycle.
//!
//! QEMU: `block/export/fuse.c`; kernel: `include/uapi/linux/fuse.h`.
//!
//! ```text
//!   server   open image, mount, signals, serve, drain, flush, unmount
//!     └─ queue     one /dev/fuse fd on one AioContext; one coroutine per request
//!          └─ export    what each request does to the image (block layer calls)
//!   request / reply / abi    bytes <-> typed requests and replies
//!   mount / sys              mount(2), fusermount3, the syscalls
//! ```

pub mod abi;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod mount;
pub mod queue;
pub mod reply;
pub mod request;
pub mod server;
pub mod sys;
pub mod uring_transport;
