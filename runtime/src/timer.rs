//! Timers on the monotonic clock, fired by the owning context's `poll()` in deadline order.
//!
//! QEMU: `util/qemu-timer.c` (`timer_new_ns`, `timer_mod`, `timer_del`,
//! `timerlist_run_timers`) restricted to one clock (`QEMU_CLOCK_REALTIME`, i.e. `Instant`).
//!
//! A timer never fires early: `poll()` rounds its wait up to whole milliseconds and runs only
//! timers whose deadline is `<= now`. Timers with equal deadlines fire in the order they were
//! armed. The heap is cleaned lazily: re-arming or deleting leaves the old entry behind, and it is
//! recognised as stale by its sequence number when it reaches the top.
//!
//! A timer re-armed from its own callback for a deadline already passed fires in the next
//! `poll()`, not in the same one, so a zero-period timer cannot starve the loop.

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::{Duration, Instant};

struct TimerState {
    cb: Rc<dyn Fn()>,
    /// `(deadline, seq)` of the live heap entry, if armed.
    armed: Cell<Option<(Instant, u64)>>,
}

struct HeapEntry {
    deadline: Instant,
    seq: u64,
    timer: Rc<TimerState>,
}

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Reverse<HeapEntry>>,
    next_seq: u64,
}

impl Heap {
    /// Pops stale entries so that the top, if any, is live.
    fn clean_top(&mut self) {
        while let Some(Reverse(top)) = self.entries.peek() {
            if top.timer.armed.get() == Some((top.deadline, top.seq)) {
                return;
            }
            self.entries.pop();
        }
    }
}

/// The timers of one context. QEMU: `QEMUTimerList`.
#[derive(Default)]
pub(crate) struct TimerList {
    heap: Rc<RefCell<Heap>>,
    expired: Cell<Vec<Rc<TimerState>>>,
}

impl TimerList {
    pub(crate) fn new_timer(&self, cb: Rc<dyn Fn()>) -> Timer {
        Timer {
            state: Rc::new(TimerState {
                cb,
                armed: Cell::new(None),
            }),
            heap: self.heap.clone(),
        }
    }

    /// The nearest deadline of an armed timer.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut heap = self.heap.borrow_mut();
        heap.clean_top();
        heap.entries.peek().map(|Reverse(e)| e.deadline)
    }

    /// Whether no timer entry (live or stale) is queued: then `poll()` need not read the clock.
    pub(crate) fn is_empty(&self) -> bool {
        self.heap.borrow().entries.is_empty()
    }

    /// Fires every timer whose deadline is `<= now`, earliest first. QEMU:
    /// `timerlist_run_timers()`.
    pub(crate) fn run_expired(&self, now: Instant) -> bool {
        let mut expired = self.expired.take();
        {
            let mut heap = self.heap.borrow_mut();
            loop {
                heap.clean_top();
                match heap.entries.peek() {
                    Some(Reverse(top)) if top.deadline <= now => {}
                    _ => break,
                }
                let Some(Reverse(entry)) = heap.entries.pop() else {
                    break;
                };
                entry.timer.armed.set(None);
                expired.push(entry.timer);
            }
        }
        let progress = !expired.is_empty();
        for timer in expired.drain(..) {
            (timer.cb)();
        }
        self.expired.set(expired);
        progress
    }
}

/// A one-shot timer; re-arm it from its callback for periodic behaviour. Dropping it disarms it.
///
/// QEMU: `QEMUTimer`.
pub struct Timer {
    state: Rc<TimerState>,
    heap: Rc<RefCell<Heap>>,
}

impl Timer {
    /// Arms (or re-arms) the timer to fire at `deadline`.
    ///
    /// QEMU: `timer_mod()`.
    pub fn modify(&self, deadline: Instant) {
        let mut heap = self.heap.borrow_mut();
        let seq = heap.next_seq;
        heap.next_seq += 1;
        self.state.armed.set(Some((deadline, seq)));
        heap.entries.push(Reverse(HeapEntry {
            deadline,
            seq,
            timer: self.state.clone(),
        }));
    }

    /// Arms the timer to fire `delay` from now.
    pub fn modify_after(&self, delay: Duration) {
        self.modify(Instant::now() + delay);
    }

    /// Disarms the timer.
    ///
    /// QEMU: `timer_del()`.
    pub fn delete(&self) {
        self.state.armed.set(None);
    }

    /// Whether the timer is armed.
    ///
    /// QEMU: `timer_pending()`.
    pub fn is_pending(&self) -> bool {
        self.state.armed.get().is_some()
    }

    /// The deadline, if armed.
    pub fn deadline(&self) -> Option<Instant> {
        self.state.armed.get().map(|(d, _)| d)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.delete();
    }
}
