//! coro-fuse's FUSE side: the kernel ABI, request parsing and reply encoding (the export, the
//! mount and the CLI build on these).
//!
//! QEMU: `block/export/fuse.c`; kernel: `include/uapi/linux/fuse.h`.

pub mod abi;
pub mod reply;
pub mod request;
