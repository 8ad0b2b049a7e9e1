//! Pinning threads to CPUs, and undoing what a pinned creator passes on.
//!
//! QEMU: none — it leaves pinning to whoever runs it (libvirt's `iothreadpin`, `taskset`);
//! libfuse's `lib/fuse_uring.c` pins each io_uring queue
//! thread to its queue's CPU, which is what the FUSE-over-io_uring transport does here
//! (`--uring-pin`, docs/fuse-uring.md).
//!
//! A Linux thread inherits its creator's CPUs, so a thread-pool worker started by a pinned
//! queue thread would be pinned too. The first [`pin_current_thread`] therefore remembers the
//! CPUs threads had before, and each new pool worker calls [`unpin_current_thread`] to go back
//! to them.

use std::io;
use std::sync::OnceLock;

/// The CPUs threads could run on before any thread was pinned ([`pin_current_thread`]).
static UNPINNED: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// Pins the calling thread to CPU `cpu` (the io_uring FUSE transport pins each queue thread to
/// its kernel queue's CPU). A thread inherits its creator's CPUs, so a thread-pool worker
/// started later by a pinned thread would be pinned too; the first pin therefore remembers the
/// CPUs the thread had before, and [`unpin_current_thread`] (each new pool worker) goes back
/// to them. libfuse pins its io_uring queue threads the same way.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let before = crate::sys::thread_affinity()?;
    UNPINNED.get_or_init(|| before);
    crate::sys::set_thread_affinity(&crate::sys::single_cpu(cpu)?)
}

/// Lets the calling thread run on every CPU threads had before the first
/// [`pin_current_thread`]; nothing if no thread was pinned.
pub(crate) fn unpin_current_thread() {
    if let Some(set) = UNPINNED.get() {
        if let Err(e) = crate::sys::set_thread_affinity(set) {
            log::debug!("cannot unpin a thread from its creator's CPU: {e}");
        }
    }
}
