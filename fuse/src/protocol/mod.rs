//! The FUSE protocol: bytes in, bytes out — nothing here reads a file descriptor, touches the
//! image or knows which thread it runs on.
//!
//! - [`abi`]: the kernel's wire structs and constants (`include/uapi/linux/fuse.h`, 7.45);
//! - [`request`]: a request's bytes → a typed, borrowed [`request::Request`];
//! - [`reply`]: a reply's header and payload slices, and the INIT negotiation.
//!
//! The transports (`crate::transport`) move these bytes between the kernel and the export;
//! the export (`crate::export`) decides what each request does. QEMU keeps all three in
//! `block/export/fuse.c` (with libfuse's `fuse_lowlevel.c` doing this part before its
//! coroutine series); libfuse's `lib/fuse_lowlevel.c` is the closest single counterpart.

pub mod abi;
pub mod reply;
pub mod request;
