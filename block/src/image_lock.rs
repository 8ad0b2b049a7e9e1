//! Image locking: QEMU's lock-byte protocol, so that coro-fuse, QEMU, `qemu-img`, `qemu-io` and
//! `qemu-storage-daemon` see each other's use of an image.
//!
//! QEMU: `block/file-posix.c` (`raw_apply_lock_bytes()`, `raw_check_lock_bytes()`,
//! `raw_handle_perm_lock()`, `RAW_LOCK_PERM_BASE`, `RAW_LOCK_SHARED_BASE`) and the `BLK_PERM_*`
//! values in `include/block/block-common.h`.
//!
//! ## The protocol
//!
//! A user of an image has a set of *permissions* it uses (`perm`) and a set it lets others use
//! (`shared`). Permission bit `i` ([`Perm`]) maps to two bytes of the image file, which are
//! locked with *shared* (read) OFD locks — QEMU never takes an exclusive lock:
//!
//! - byte `100 + i` is locked by everyone who **uses** permission `i`;
//! - byte `200 + i` is locked by everyone who **does not share** permission `i`.
//!
//! Opening then has two steps (QEMU's `RAW_PL_PREPARE`): lock our own bytes, then *test* with
//! `F_OFD_GETLK` for a write lock (which any shared lock held by someone else blocks):
//!
//! - for each permission we use, byte `200 + i`: someone refuses to share it →
//!   `Failed to get "write" lock`;
//! - for each permission we do not share, byte `100 + i`: someone uses it →
//!   `Failed to get shared "write" lock`.
//!
//! Locking before testing makes two concurrent openers safe: each one sees the other's bytes,
//! so at worst both fail, never both succeed. The locks go away with the file descriptor.
//!
//! ## What coro-fuse asks for
//!
//! | open | perm | shared | like |
//! |---|---|---|---|
//! | read-write | consistent read, write, resize | consistent read, write unchanged | a VM disk (`share-rw=off`) |
//! | read-only | consistent read | consistent read, write unchanged | a read-only VM disk |
//! | `-U` / force-share | no locks at all | | `qemu-img info -U` |
//!
//! Measured against QEMU 10.0 (`block/tests/locking.rs`): while coro-fuse has an image open
//! read-write, `qemu-io -f raw img` fails with `Failed to get "write" lock`, `qemu-img convert`
//! from it with `Failed to get shared "write" lock`, a second coro-fuse (even read-only) is
//! refused; `qemu-img info` and `qemu-io -r` still work (they take no permission we refuse to
//! share). Conversely a running `qemu-io -f raw img` holds bytes 100 and 101, so coro-fuse
//! refuses to open that image unless told `-U`.
//!
//! Differences from QEMU: permissions are fixed at open (no re-opening with other permissions);
//! a filesystem that does not support OFD locks (`ENOLCK`, `EINVAL`, `EOPNOTSUPP`) gets a warning
//! and no locking, where QEMU with `locking=auto` would report an error.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use crate::sys::{self, LockType};

/// A set of block permissions. QEMU: `BLK_PERM_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perm(u64);

impl Perm {
    pub const NONE: Perm = Perm(0);
    /// `BLK_PERM_CONSISTENT_READ`: the contents read are a consistent disk.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// `BLK_PERM_WRITE`: may change the visible contents.
    pub const WRITE: Perm = Perm(0x02);
    /// `BLK_PERM_WRITE_UNCHANGED`: may write without changing the visible contents.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// `BLK_PERM_RESIZE`: may change the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// `BLK_PERM_ALL`. (QEMU ≤ 6.1 also had `GRAPH_MOD` = 0x10, whose byte old versions may
    /// still lock; nobody tests it any more.)
    pub const ALL: Perm = Perm(0x0f);

    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits of [`Perm::ALL`] not in `self`.
    pub const fn complement(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    /// `(bit index, name)` of each permission in the set, in bit order. QEMU: `PERM_FOREACH`.
    fn each(self) -> impl Iterator<Item = (u64, &'static str)> {
        (0..Perm::NAMES.len() as u64)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i, Perm::NAMES[i as usize]))
    }
}

impl fmt::Display for Perm {
    /// Comma-separated names, as QEMU's `bdrv_perm_names()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (_, name) in self.each() {
            if !first {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

/// `RAW_LOCK_PERM_BASE`: libvirt uses byte 0; QEMU leaves room and starts at 100.
pub const LOCK_PERM_BASE: u64 = 100;
/// `RAW_LOCK_SHARED_BASE`.
pub const LOCK_SHARED_BASE: u64 = 200;

/// The permissions coro-fuse takes: see the table in the module documentation.
pub fn perms_for(read_only: bool) -> (Perm, Perm) {
    let shared = Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED);
    if read_only {
        (Perm::CONSISTENT_READ, shared)
    } else {
        (
            Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE),
            shared,
        )
    }
}

/// Why [`lock`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another user holds a conflicting lock; QEMU's message for it, e.g.
    /// `Failed to get shared "write" lock`.
    Conflict(String),
    /// The lock syscall failed for another reason.
    Io(io::Error),
}

/// Whether an error means "this filesystem has no OFD locks" rather than a conflict.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

fn conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}

/// Takes the lock bytes for `perm`/`shared` on `fd` and checks that nobody else conflicts.
/// On failure every byte taken is released again. Returns `Ok(false)` if the filesystem does
/// not support OFD locks (the image is then used unlocked, with a warning).
///
/// QEMU: `raw_handle_perm_lock()`, `RAW_PL_PREPARE` followed by `RAW_PL_COMMIT` (or
/// `RAW_PL_ABORT`).
pub fn lock(fd: BorrowedFd<'_>, perm: Perm, shared: Perm) -> Result<bool, LockError> {
    match apply(fd, perm, shared.complement()).and_then(|()| check(fd, perm, shared)) {
        Ok(()) => Ok(true),
        Err(LockError::Io(e)) if unsupported(&e) => {
            unlock_all(fd);
            log::warn!("the filesystem does not support OFD locks ({e}); the image is not locked");
            Ok(false)
        }
        Err(e) => {
            unlock_all(fd);
            Err(e)
        }
    }
}

/// QEMU: `raw_apply_lock_bytes()` (locking only: we never change permissions later).
fn apply(fd: BorrowedFd<'_>, perm: Perm, unshared: Perm) -> Result<(), LockError> {
    let bytes = perm
        .each()
        .map(|(i, _)| LOCK_PERM_BASE + i)
        .chain(unshared.each().map(|(i, _)| LOCK_SHARED_BASE + i));
    for byte in bytes {
        if let Err(e) = sys::ofd_setlk(fd, LockType::Read, byte, 1) {
            if conflict(&e) {
                return Err(LockError::Conflict(format!("Failed to lock byte {byte}")));
            }
            return Err(LockError::Io(e));
        }
    }
    Ok(())
}

/// QEMU: `raw_check_lock_bytes()`.
fn check(fd: BorrowedFd<'_>, perm: Perm, shared: Perm) -> Result<(), LockError> {
    for (i, name) in perm.each() {
        if sys::ofd_getlk(fd, LockType::Write, LOCK_SHARED_BASE + i, 1).map_err(LockError::Io)? {
            return Err(LockError::Conflict(format!(
                "Failed to get \"{name}\" lock"
            )));
        }
    }
    for (i, name) in shared.complement().each() {
        if sys::ofd_getlk(fd, LockType::Write, LOCK_PERM_BASE + i, 1).map_err(LockError::Io)? {
            return Err(LockError::Conflict(format!(
                "Failed to get shared \"{name}\" lock"
            )));
        }
    }
    Ok(())
}

/// Releases every lock byte of ours (QEMU: `RAW_PL_ABORT`). Unlocking cannot conflict.
fn unlock_all(fd: BorrowedFd<'_>) {
    for base in [LOCK_PERM_BASE, LOCK_SHARED_BASE] {
        if let Err(e) = sys::ofd_setlk(fd, LockType::Unlock, base, Perm::NAMES.len() as u64) {
            log::debug!("unlocking bytes {base}..: {e}");
        }
    }
}

/// Which lock bytes someone *other than `fd`'s open file* holds, as `(perm, unshared)` — for
/// diagnostics and tests ("who is using this image?").
pub fn held_by_others(fd: BorrowedFd<'_>) -> io::Result<(Perm, Perm)> {
    let mut perm = Perm::NONE;
    let mut unshared = Perm::NONE;
    for (i, _) in Perm::ALL.each() {
        if sys::ofd_getlk(fd, LockType::Write, LOCK_PERM_BASE + i, 1)? {
            perm = perm.union(Perm(1 << i));
        }
        if sys::ofd_getlk(fd, LockType::Write, LOCK_SHARED_BASE + i, 1)? {
            unshared = unshared.union(Perm(1 << i));
        }
    }
    Ok((perm, unshared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_names_and_sets() {
        let (rw, shared) = perms_for(false);
        assert_eq!(rw.to_string(), "consistent read, write, resize");
        assert_eq!(shared.complement().to_string(), "write, resize");
        assert_eq!(perms_for(true).0, Perm::CONSISTENT_READ);
        assert!(rw.contains(Perm::WRITE));
        assert_eq!(Perm::ALL.complement(), Perm::NONE);
    }
}
