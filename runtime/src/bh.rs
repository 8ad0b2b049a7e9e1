//! Bottom halves: callbacks deferred to the next round of the event loop.
//!
//! QEMU: `util/async.c` (`aio_bh_new`, `qemu_bh_schedule`, `qemu_bh_cancel`, `qemu_bh_delete`,
//! `aio_bh_schedule_oneshot`, `aio_bh_poll`).
//!
//! The rule that matters: a round runs the bottom halves that were scheduled *before* it began.
//! One scheduled while the round runs (even by itself) waits for the next round, so a bottom half
//! that reschedules itself cannot starve fd handlers and timers. `poll()` does not block while a
//! bottom half is pending.
//!
//! Scheduling a scheduled bottom half does nothing (it still runs once); cancelling clears the flag
//! and the queue entry is skipped when reached, as in QEMU, where the list is also cleaned lazily.
//! Bottom halves from other threads arrive through [`crate::RemoteContext`]; they are one-shot.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

struct BhState {
    cb: RefCell<Option<Rc<dyn Fn()>>>,
    scheduled: Cell<bool>,
}

enum Entry {
    Bh(Rc<BhState>),
    Oneshot(Box<dyn FnOnce()>),
}

/// The per-context queue of scheduled bottom halves.
#[derive(Default)]
pub(crate) struct BhList {
    queue: Rc<RefCell<VecDeque<Entry>>>,
    /// The batch being run, kept to reuse its allocation.
    spare: Cell<VecDeque<Entry>>,
}

impl BhList {
    pub(crate) fn new_bh(&self, cb: Rc<dyn Fn()>) -> Bh {
        Bh {
            state: Rc::new(BhState {
                cb: RefCell::new(Some(cb)),
                scheduled: Cell::new(false),
            }),
            queue: self.queue.clone(),
        }
    }

    pub(crate) fn schedule_oneshot(&self, f: Box<dyn FnOnce()>) {
        self.queue.borrow_mut().push_back(Entry::Oneshot(f));
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Runs one round; returns whether any bottom half ran. QEMU: `aio_bh_poll()`.
    pub(crate) fn poll(&self) -> bool {
        let mut batch = self.spare.take();
        std::mem::swap(&mut batch, &mut *self.queue.borrow_mut());
        let mut progress = false;
        for entry in batch.drain(..) {
            match entry {
                Entry::Oneshot(f) => {
                    f();
                    progress = true;
                }
                Entry::Bh(bh) => {
                    if !bh.scheduled.replace(false) {
                        continue; // cancelled or deleted since it was queued
                    }
                    // Clone the callback out so it may reschedule or delete its own BH.
                    let cb = bh.cb.borrow().clone();
                    if let Some(cb) = cb {
                        cb();
                        progress = true;
                    }
                }
            }
        }
        self.spare.set(batch);
        progress
    }
}

/// A reusable bottom half bound to the context that created it. Dropping it deletes it: a
/// pending run is cancelled.
///
/// QEMU: `QEMUBH`.
pub struct Bh {
    state: Rc<BhState>,
    queue: Rc<RefCell<VecDeque<Entry>>>,
}

impl Bh {
    /// Makes the callback run once in the next round; does nothing if already scheduled.
    ///
    /// QEMU: `qemu_bh_schedule()`.
    pub fn schedule(&self) {
        if self.state.cb.borrow().is_none() || self.state.scheduled.replace(true) {
            return;
        }
        self.queue
            .borrow_mut()
            .push_back(Entry::Bh(self.state.clone()));
    }

    /// Withdraws a pending run, if any.
    ///
    /// QEMU: `qemu_bh_cancel()`.
    pub fn cancel(&self) {
        self.state.scheduled.set(false);
    }

    /// Deletes the bottom half (same as dropping it): a pending run is cancelled.
    ///
    /// QEMU: `qemu_bh_delete()`.
    pub fn delete(self) {}

    /// Whether a run is pending.
    pub fn is_scheduled(&self) -> bool {
        self.state.scheduled.get()
    }
}

impl Drop for Bh {
    fn drop(&mut self) {
        self.cancel();
        // Drop the callback now: it may hold references that would otherwise live until the
        // stale queue entry is reached.
        self.state.cb.borrow_mut().take();
    }
}
