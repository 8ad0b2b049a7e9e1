//! Test hooks that make an allocation fail on purpose, so the code that answers the failure
//! (a FUSE request replying `ENOMEM`) can be tested without exhausting the machine.
//!
//! QEMU: the closest is `block/blkdebug.c`'s rules for I/O; for allocations QEMU has none
//! (`g_malloc` aborts).

use std::sync::atomic::{AtomicUsize, Ordering};

/// "Let the next `after` attempts succeed, then fail `count`": a process-wide countdown. Unarmed
/// (the default) it costs one atomic load per check.
#[derive(Debug, Default)]
pub struct FailAfter {
    after: AtomicUsize,
    count: AtomicUsize,
}

impl FailAfter {
    pub const fn new() -> FailAfter {
        FailAfter {
            after: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
        }
    }

    /// Arms the countdown; `count == 0` disarms it.
    pub fn arm(&self, after: usize, count: usize) {
        self.after.store(after, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `fire`, so a thread that sees the count also
        // sees `after`.
        self.count.store(count, Ordering::Release);
    }

    /// Whether this attempt is one that must fail.
    #[inline]
    pub fn fire(&self) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.fire_slow()
    }

    #[cold]
    fn fire_slow(&self) -> bool {
        let dec = |n: usize| n.checked_sub(1);
        // Relaxed: a test hook's counters; each decrement is atomic, their order does not matter.
        if self
            .after
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, dec)
            .is_ok()
        {
            return false;
        }
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, dec)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::FailAfter;

    #[test]
    fn fails_count_attempts_after_after() {
        let f = FailAfter::new();
        assert!(!f.fire(), "unarmed");
        f.arm(2, 2);
        let got: Vec<bool> = (0..6).map(|_| f.fire()).collect();
        assert_eq!(got, [false, false, true, true, false, false]);
    }
}
