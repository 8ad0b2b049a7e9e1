//! coro-fuse's FUSE side: the protocol, the transports that carry it, the export's semantics,
//! mounting, and the lifecycle that ties them together.
//!
//! QEMU: `block/export/fuse.c`; kernel: `include/uapi/linux/fuse.h`, `fs/fuse/dev.c`.
//!
//! ```text
//!   server      open the image, mount, start a queue per thread, serve, drain, flush, unmount
//!   transport   how requests arrive and replies leave (per queue thread)
//!     ├─ dev       a /dev/fuse fd (the mount's, or a clone) read on the thread's AioContext
//!     └─ buf       the one buffer type and its pool; the request layout
//!   session     what all queues share; one request's path from bytes to reply, both engines
//!   export      what each request does to the image (block layer calls)
//!     ├─ coroutine    the I/O half, as `co_` calls that yield      (--engine coroutine)
//!     └─ async_engine the I/O half, as futures                     (--engine async)
//!   protocol    bytes <-> typed requests and replies: abi, request, reply (+ INIT)
//!   mount       mount(2) or fusermount3, unmount, the mountpoint checks
//!   sys         the syscalls (every `unsafe` block of the library)
//! ```
//!
//! Dependencies point down this list: `protocol` and `sys` know nothing above them, `export`
//! knows no transport, a transport knows no opcode.

pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod mount;
pub mod protocol;
pub mod server;
pub mod session;
pub mod sys;
pub mod transport;
